//! The policy plugin chains of the `sluice-1p` and `sluice-4p` targets: their gateway
//! config, and what the load generator sends so that every upgrade is **allowed**.
//!
//! Both chains admit the bench's requests, so the measured cost is that of plugins doing
//! their full work on the success path: `origin-allowlist` matches the `Origin` header,
//! `jwt-auth` verifies an HS256 token from `Authorization: Bearer` (minted once per
//! session by [`token`]) and forwards two claims as headers, `tenant-router` routes on
//! the forwarded `x-tenant` to a second pool on the same echo backend, and `sticky-key`
//! sets that pool's consistent-hash key from the forwarded `x-user` (the verified `sub`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// The `Origin` the load generator sends; the allowlist accepts it by wildcard.
const ORIGIN: &str = "https://app.bench.example";
/// HS256 secret shared by the token minter and `jwt-auth` (bench-only, never reused).
const SECRET: &str = "sluice-bench-secret-do-not-use";
/// The token's `iss` and `aud` claims, which `jwt-auth` checks.
const ISSUER: &str = "https://auth.bench.example";
/// See [`ISSUER`].
const AUDIENCE: &str = "sluice-bench";
/// Lifetime of the session's token: longer than any session.
const TOKEN_TTL_SECS: u64 = 24 * 3600;

/// The plugin component files, in chain order, and their instance names in the config.
pub const CHAIN: [(&str, &str); 4] = [
    ("origin", "origin-allowlist.wasm"),
    ("auth", "jwt-auth.wasm"),
    ("tenants", "tenant-router.wasm"),
    ("sticky", "sticky-key.wasm"),
];

/// Mints the session's JWT: HS256, `sub` and `tenant` claims, valid for a day.
pub fn token() -> String {
    token_for("bench-user")
}

/// [`headers`] with a new token (its `sub` and `iat` from `n`) and a new origin under
/// the allowlist's wildcard, for every upgrade: nothing a plugin saw before, so every
/// plugin is called and `jwt-auth` verifies every token (`sluice-4p-called`).
pub fn fresh_headers(n: u64) -> String {
    let token = token_for(&format!("u{n:016x}"));
    format!(
        "Origin: https://c{:x}.bench.example\r\nAuthorization: Bearer {token}\r\n",
        n >> 40
    )
}

/// A token for `sub`, valid for a day.
fn token_for(sub: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = serde_json::json!({
        "sub": sub,
        "tenant": "bench",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + TOKEN_TTL_SECS,
    });
    sluice_jwt::mint::hs256(&claims, SECRET.as_bytes())
}

/// Extra upgrade-request header lines (each ending in CRLF) for a chain of `plugins`
/// plugins: none without plugins, else `Origin` and `Authorization: Bearer`. Both chains
/// get both headers, so the 1- and 4-plugin requests are the same bytes.
pub fn headers(plugins: usize, token: &str) -> String {
    match plugins {
        0 => String::new(),
        _ => format!("Origin: {ORIGIN}\r\nAuthorization: Bearer {token}\r\n"),
    }
}

/// The TOML to append to the bench's Sluice config right after its one route's keys:
/// the route's `plugins` (and `pools`) list, then the plugin tables (the first `plugins`
/// of [`CHAIN`], loaded by absolute path from `wasm_dir`) and, for tenant-router, the
/// pool it routes to. Empty for no plugins. Plugin limits are Sluice's defaults, but
/// for `max_reused = 0` when `reuse` is false (every plugin called for every upgrade).
pub fn sluice_toml(plugins: usize, reuse: bool, wasm_dir: &Path, backend: SocketAddr) -> String {
    if plugins == 0 {
        return String::new();
    }
    let chain = &CHAIN[..plugins.min(CHAIN.len())];
    let names: Vec<String> = chain.iter().map(|(name, _)| format!("{name:?}")).collect();
    let mut toml = format!("plugins = [{}]\n", names.join(", "));
    if plugins >= 3 {
        toml.push_str(&format!(
            r#"pools = ["hashed"]

# The pool tenant-router picks: the same echo backend, balanced by sticky-key's key.
[upstreams.hashed]
servers = ["{backend}"]
balance = "hash"
"#
        ));
    }
    for (name, file) in chain {
        let path = wasm_dir.join(file);
        let config = match *name {
            "origin" => r#"allowed = ["https://bench.example", "https://*.bench.example"]
allow_missing = false"#
                .to_string(),
            "auth" => format!(
                r#"keys = [{{ alg = "HS256", secret = "{SECRET}" }}]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
forward_claims = {{ sub = "x-user", tenant = "x-tenant" }}"#
            ),
            "tenants" => r#"rules = [{ header = "x-tenant", value = "bench", tenant = "bench", pool = "hashed" }]"#
                .to_string(),
            _ => r#"sources = [{ header = "x-user" }]
fallback = "client_ip""#
                .to_string(),
        };
        let limits = if reuse { "" } else { "max_reused = 0\n" };
        toml.push_str(&format!(
            "\n[plugins.{name}]\npath = {:?}\n{limits}[plugins.{name}.config]\n{config}\n",
            path.display().to_string()
        ));
    }
    toml
}

/// The `hostile` fixture's `floor` build (no `on_close`), whose `pass` the floor chain
/// runs.
pub const FLOOR_FILE: &str = "hostile-floor.wasm";

/// What each plugin of [`CHAIN`] says it reads (`init`'s interest): its request headers
/// and other fields, by WIT name.
const INTERESTS: [(&str, &str); 4] = [
    (r#"["origin"]"#, "[]"),
    (r#"["authorization"]"#, r#"["subprotocols", "query"]"#),
    (r#"["x-tenant"]"#, "[]"),
    (r#"["x-user"]"#, r#"["client-ip"]"#),
];

/// The floor chain's TOML (`sluice-4p-floor`): four plugins named as in [`CHAIN`], each
/// the `hostile` fixture's `floor` build answering `pass` (allow, nothing else) and
/// declaring what its namesake reads, so the host lowers the same requests into them;
/// every one called for every upgrade (`max_reused = 0`). What the real chain costs
/// beyond it is the plugins' work and their decisions' mutations.
pub fn floor_toml(wasm_dir: &Path) -> String {
    let names: Vec<String> = CHAIN.iter().map(|(name, _)| format!("{name:?}")).collect();
    let mut toml = format!("plugins = [{}]\n", names.join(", "));
    let path = wasm_dir.join(FLOOR_FILE).display().to_string();
    for ((name, _), (headers, fields)) in CHAIN.iter().zip(INTERESTS) {
        toml.push_str(&format!(
            "\n[plugins.{name}]\npath = {path:?}\nmax_reused = 0\n[plugins.{name}.config]\non_request = \"pass\"\nheaders = {headers}\nfields = {fields}\n"
        ));
    }
    toml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_headers_differ_every_time_and_still_verify() {
        let (one, two) = (fresh_headers(1 << 40), fresh_headers(2 << 40));
        assert_ne!(one, two);
        for h in [&one, &two] {
            let origin = h.lines().next().unwrap().strip_prefix("Origin: ").unwrap();
            assert!(origin.ends_with(".bench.example"), "{origin}");
            let token = h.split("Bearer ").nth(1).unwrap().trim_end();
            let claims = sluice_jwt::verify(
                token,
                &[sluice_jwt::Key::hs256(SECRET.as_bytes()).expect("an HS256 key")],
                &sluice_jwt::Validation::default(),
                0,
            )
            .unwrap();
            assert_eq!(claims["tenant"], "bench");
        }
    }

    #[test]
    fn token_verifies_with_the_configured_key() {
        let token = token();
        let validation = sluice_jwt::Validation {
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            leeway_secs: 0,
            require_exp: true,
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let keys = [sluice_jwt::Key::hs256(SECRET.as_bytes()).expect("an HS256 key")];
        let claims = sluice_jwt::verify(&token, &keys, &validation, now).expect("valid");
        assert_eq!(
            sluice_jwt::claim_str(&claims, "tenant").as_deref(),
            Some("bench")
        );
        assert_eq!(headers(0, &token), "");
        assert!(headers(4, &token).contains(&format!("Authorization: Bearer {token}\r\n")));
    }

    #[test]
    fn the_floor_chain_passes_and_reads_what_the_chain_reads() {
        let floor = floor_toml(Path::new("/p"));
        assert!(
            floor.starts_with("plugins = [\"origin\", \"auth\", \"tenants\", \"sticky\"]\n"),
            "{floor}"
        );
        assert_eq!(
            floor.matches("path = \"/p/hostile-floor.wasm\"").count(),
            4,
            "{floor}"
        );
        assert_eq!(floor.matches("on_request = \"pass\"").count(), 4, "{floor}");
        assert_eq!(floor.matches("max_reused = 0").count(), 4, "{floor}");
        // sticky-key reads the `x-user` jwt-auth forwards, and the client IP to fall back on.
        assert!(
            floor.ends_with("headers = [\"x-user\"]\nfields = [\"client-ip\"]\n"),
            "{floor}"
        );
    }

    #[test]
    fn chains_name_their_plugins_in_order() {
        let backend: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let dir = Path::new("/p");
        assert_eq!(sluice_toml(0, true, dir, backend), "");
        let one = sluice_toml(1, true, dir, backend);
        assert!(one.starts_with("plugins = [\"origin\"]\n"), "{one}");
        assert!(one.contains("path = \"/p/origin-allowlist.wasm\""), "{one}");
        assert!(!one.contains("[plugins.auth]"), "{one}");
        let four = sluice_toml(4, true, dir, backend);
        assert!(
            four.starts_with(
                "plugins = [\"origin\", \"auth\", \"tenants\", \"sticky\"]\npools = [\"hashed\"]\n"
            ),
            "{four}"
        );
        assert!(four.contains("path = \"/p/sticky-key.wasm\""), "{four}");
        assert!(!four.contains("max_reused"), "{four}");
        let called = sluice_toml(4, false, dir, backend);
        assert_eq!(called.matches("\nmax_reused = 0\n").count(), 4, "{called}");
    }
}
