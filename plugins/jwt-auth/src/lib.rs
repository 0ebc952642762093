//! `jwt-auth`: admit requests carrying a valid JWT (HS256, RS256 or ES256),
//! forward chosen claims upstream as headers, refuse the rest with 401.
//!
//! The token is read from `Authorization: Bearer`, a `Sec-WebSocket-Protocol`
//! entry (`bearer.<token>` by default) or a query parameter (`access_token`),
//! since browsers cannot set headers on a WebSocket. A token found in the
//! subprotocol list is removed from the list sent upstream.
//!
//! Config:
//!
//! ```json
//! {
//!   "keys": [
//!     {"alg": "HS256", "secret": "dev-secret"},
//!     {"alg": "RS256", "public_key_pem": "-----BEGIN PUBLIC KEY-----\n..."},
//!     {"alg": "ES256", "public_key_pem": "-----BEGIN PUBLIC KEY-----\n..."}
//!   ],
//!   "issuer": "https://auth.example.com",
//!   "audience": "sluice",
//!   "leeway_secs": 30,
//!   "require_exp": true,
//!   "sources": {"header": true, "protocol_prefix": "bearer.", "query_param": "access_token"},
//!   "forward_claims": {"sub": "x-user", "tenant": "x-tenant"},
//!   "cache_size": 256
//! }
//! ```
//!
//! Keys may come from an identity provider's JWKS instead of (or as well as) `keys`:
//!
//! ```json
//! {"jwks": {"url": "https://idp.example/.well-known/jwks.json",
//!           "min_refresh_secs": 60, "max_refresh_secs": 3600}}
//! ```
//!
//! The gateway fetches it in the background (the URL must be in the plugin's
//! `grants.http`; a load without the grant fails and says so), again when its
//! `Cache-Control: max-age` runs out (kept between the two bounds, defaults 60 s and
//! an hour), and early, at most once per `min_refresh_secs`, when a token names a
//! `kid` the set lacks (that token is refused; a retry after the fetch is admitted).
//! RSA (RS256) and P-256 (ES256) keys are read, by `kid`.
//!
//! Or the set is found through an OpenID provider's discovery document:
//!
//! ```json
//! {"jwks": {"discovery": "https://idp.example/.well-known/openid-configuration"}}
//! ```
//!
//! read once, at load, for its `jwks_uri` (both URLs must be granted) and its `issuer`,
//! which tokens must then name in `iss` (a config `issuer` that differs is refused). A
//! `jwks_uri` the provider changes later is followed at the next reload.
//!
//! A copy that is not a usable
//! JWKS is logged and the previous keys kept; a server that is down keeps them too.
//! When the keys change, the instance forgets the tokens it verified, and the gateway
//! the admissions it would have given again, so a removed key's tokens are refused
//! from the next request.
//!
//! Signatures are checked by the gateway in native code (the SDK's `crypto::Key`, keys
//! parsed once, at load or when the JWKS changes); the plugin carries no HMAC, RSA or
//! P-256 code.
//!
//! Each instance remembers up to about `cache_size` tokens it has verified
//! (default 256; 0 turns the cache off), so a client that reconnects with the
//! same token skips the signature check. `exp` and `nbf` are checked again on
//! every use, so a cached token expires on time; a config reload starts with an
//! empty cache, so a key taken out of the config stops admitting its tokens.
//!
//! An admission depends on the token alone until it expires, so the gateway
//! may give it again to requests with the same token (and the same other
//! inputs this plugin reads) without a call, until the first millisecond at
//! which `exp` would refuse it, and for at most a minute. Refusals are never
//! reused.

mod cache;

use std::collections::BTreeMap;
use std::time::Duration;

use std::cell::{Cell, RefCell};

use cache::{Cache, Verified};
use serde::Deserialize;
use sluice_jwt::jwks::KeySet;
use sluice_jwt::token::{TokenFrom, TokenSources};
use sluice_jwt::{JwtError, Key, Validation, check_times};
use sluice_plugin_sdk::{
    Config, Decision, Fields, Level, Plugin, Request, documents, export, host,
};

/// One verification key as written in the config.
#[derive(Debug, Deserialize)]
#[serde(tag = "alg", deny_unknown_fields)]
enum KeyConfig {
    #[serde(rename = "HS256")]
    Hs256 { secret: String },
    #[serde(rename = "RS256")]
    Rs256 { public_key_pem: String },
    #[serde(rename = "ES256")]
    Es256 { public_key_pem: String },
}

/// Where a JWKS comes from and how often it is fetched.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwksConfig {
    /// The key set's own URL.
    url: Option<String>,
    /// An OpenID provider's discovery document (`/.well-known/openid-configuration`),
    /// read at load for the key set's URL (`jwks_uri`) and the provider's `issuer`.
    discovery: Option<String>,
    #[serde(default = "default_min_refresh")]
    min_refresh_secs: u64,
    #[serde(default = "default_max_refresh")]
    max_refresh_secs: u64,
}

fn default_min_refresh() -> u64 {
    60
}

fn default_max_refresh() -> u64 {
    3600
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    keys: Vec<KeyConfig>,
    jwks: Option<JwksConfig>,
    issuer: Option<String>,
    audience: Option<String>,
    #[serde(default = "default_leeway")]
    leeway_secs: u64,
    #[serde(default = "default_true")]
    require_exp: bool,
    #[serde(default)]
    sources: TokenSources,
    /// claim → upstream header.
    #[serde(default)]
    forward_claims: BTreeMap<String, String>,
    /// Verified tokens remembered per instance.
    #[serde(default = "default_cache_size")]
    cache_size: usize,
}

/// Tokens remembered per instance unless the config says otherwise.
const DEFAULT_CACHE_SIZE: usize = 256;
/// Most tokens one instance may remember.
const MAX_CACHE_SIZE: usize = 1 << 16;

fn default_cache_size() -> usize {
    DEFAULT_CACHE_SIZE
}

fn default_leeway() -> u64 {
    30
}

fn default_true() -> bool {
    true
}

/// A JWKS the host keeps fresh, and the version of it this instance read.
struct Jwks {
    url: String,
    seen: Cell<u64>,
}

/// The plugin: keys, claim checks, and the claims to forward.
pub struct JwtAuth {
    /// The config's own keys.
    fixed: Vec<Key>,
    /// Those and the JWKS's current keys.
    keys: RefCell<KeySet>,
    jwks: Option<Jwks>,
    validation: Validation,
    sources: TokenSources,
    forward_claims: BTreeMap<String, String>,
    /// The claims read of a token besides those checked: the forwarded ones, in
    /// `forward_claims`' order, then `sub` (for the access log).
    wanted: Vec<String>,
    cache: Cache,
}

impl Plugin for JwtAuth {
    fn init(config: Config) -> Result<Self, String> {
        let raw: RawConfig = config.parse()?;
        if raw.keys.is_empty() && raw.jwks.is_none() {
            return Err("`keys` must list at least one key, or `jwks` name a key set".into());
        }
        if raw.cache_size > MAX_CACHE_SIZE {
            return Err(format!("`cache_size` must be at most {MAX_CACHE_SIZE}"));
        }
        let fixed: Vec<Key> = raw
            .keys
            .into_iter()
            .map(|k| match k {
                KeyConfig::Hs256 { secret } if secret.len() < 16 => {
                    Err("HS256 secret must be at least 16 bytes".to_owned())
                }
                KeyConfig::Hs256 { secret } => Key::hs256(secret.as_bytes()),
                KeyConfig::Rs256 { public_key_pem } => Key::rs256_pem(&public_key_pem),
                KeyConfig::Es256 { public_key_pem } => Key::es256_pem(&public_key_pem),
            })
            .collect::<Result<_, _>>()?;
        let (jwks, issuer) = match raw.jwks {
            Some(j) => watch(j, raw.issuer).map(|(jwks, issuer)| (Some(jwks), issuer))?,
            None => (None, raw.issuer),
        };
        let plugin = JwtAuth {
            keys: RefCell::new(KeySet::from_keys(fixed.clone())),
            fixed,
            jwks,
            validation: Validation {
                issuer,
                audience: raw.audience,
                leeway_secs: raw.leeway_secs,
                require_exp: raw.require_exp,
            },
            sources: raw.sources,
            wanted: raw
                .forward_claims
                .keys()
                .cloned()
                .chain(["sub".to_owned()])
                .collect(),
            forward_claims: raw.forward_claims,
            cache: Cache::new(raw.cache_size),
        };
        plugin.sync();
        Ok(plugin)
    }

    fn request_headers(&self) -> Option<Vec<String>> {
        Some(self.sources.headers().collect())
    }

    fn request_fields(&self) -> Option<Fields> {
        Some(self.sources.fields())
    }

    fn on_request(&self, req: &Request) -> Decision {
        let Some((token, from)) = self.sources.find(req) else {
            return unauthorized("missing token", "invalid_request");
        };
        self.sync();
        let now_ms = host::now_ms();
        let now = now_ms / 1000;
        let verified = match self.cache.get(&token) {
            Some(hit) => match check_times(hit.exp, hit.nbf, &self.validation, now) {
                Ok(()) => hit,
                Err(e) => return unauthorized(&e.to_string(), "invalid_token"),
            },
            None => {
                match self
                    .keys
                    .borrow()
                    .verify_picking(&token, &self.validation, now, &self.wanted)
                {
                    Ok(mut picked) => {
                        // `wanted` is the forwarded claims, then `sub`.
                        let sub = picked.values.pop().flatten();
                        let verified = Verified {
                            exp: picked.exp,
                            nbf: picked.nbf,
                            forwarded: picked.values,
                            sub,
                        };
                        self.cache.put(&token, verified)
                    }
                    Err(e) => {
                        if let (JwtError::UnknownKey(_), Some(jwks)) = (&e, &self.jwks) {
                            // Perhaps the provider rotated its keys: fetch again (at most
                            // once per `min_refresh_secs`); a retry after it is admitted.
                            documents::refresh_soon(&jwks.url);
                        }
                        return unauthorized(&e.to_string(), "invalid_token");
                    }
                }
            }
        };
        self.admit(&verified, from, req)
            .reuse_for(self.reuse(verified.exp, now_ms))
    }
}

/// Longest the gateway may admit a token again without a call.
const MAX_REUSE: Duration = Duration::from_secs(60);

/// Starts the host's fetches of a JWKS (refused unless its URL is granted), found
/// through the provider's discovery document when the config names that. Returns it
/// and the `iss` tokens must carry: the config's `issuer`, or else the provider's.
fn watch(j: JwksConfig, issuer: Option<String>) -> Result<(Jwks, Option<String>), String> {
    if j.min_refresh_secs == 0 || j.max_refresh_secs < j.min_refresh_secs {
        return Err("`jwks`: need 1 <= `min_refresh_secs` <= `max_refresh_secs`".into());
    }
    let (min, max) = (
        Duration::from_secs(j.min_refresh_secs),
        Duration::from_secs(j.max_refresh_secs),
    );
    let discovered = j.discovery.is_some();
    let (url, issuer) = match (j.url, j.discovery) {
        (Some(url), None) => (url, issuer),
        (None, Some(discovery)) => {
            let provider = discover(&discovery, min, max)?;
            match issuer {
                Some(configured) if configured != provider.issuer => {
                    return Err(format!(
                        "`jwks.discovery`: the provider's issuer is {:?}, not the `issuer` \
                         {configured:?} the config requires",
                        provider.issuer
                    ));
                }
                _ => (provider.jwks_uri, Some(provider.issuer)),
            }
        }
        _ => {
            return Err("`jwks`: name the key set by `url` or by `discovery` (one of them)".into());
        }
    };
    documents::watch(&url, min, max).map_err(|e| match discovered {
        true => format!("`jwks.discovery`: the provider's `jwks_uri`: {e}"),
        false => format!("`jwks.url`: {e}"),
    })?;
    let jwks = Jwks {
        url,
        seen: Cell::new(0),
    };
    Ok((jwks, issuer))
}

/// What jwt-auth reads of an OpenID provider's discovery document.
#[derive(Debug, Deserialize)]
struct Provider {
    issuer: String,
    jwks_uri: String,
}

/// The provider the discovery document at `url` describes, read once, at load (the host
/// keeps the document fresh like any watched one; a `jwks_uri` it changes later is
/// followed at the next reload).
fn discover(url: &str, min: Duration, max: Duration) -> Result<Provider, String> {
    let at = |e: String| format!("`jwks.discovery`: {e}");
    documents::watch(url, min, max).map_err(at)?;
    let copy = documents::latest(url, 0)
        .ok_or_else(|| at(format!("no good copy of {url} could be fetched")))?;
    serde_json::from_slice(&copy.body).map_err(|e| {
        at(format!(
            "{url} is not an OpenID provider's discovery document: {e}"
        ))
    })
}

impl JwtAuth {
    /// Takes the JWKS's newer copy, if the host has one: its keys replace the previous
    /// ones (and the tokens verified with them are forgotten), unless it is not a usable
    /// key set, which is logged and changes nothing.
    fn sync(&self) {
        let Some(jwks) = &self.jwks else { return };
        let Some(copy) = documents::latest(&jwks.url, jwks.seen.get()) else {
            return;
        };
        jwks.seen.set(copy.version);
        match KeySet::parse(&copy.body) {
            Ok((set, skipped)) => {
                for why in &skipped {
                    host::log(Level::Debug, "JWKS key skipped", &[("key", why)]);
                }
                *self.keys.borrow_mut() = KeySet::from_keys(self.fixed.clone()).merged(set);
                self.cache.clear();
            }
            Err(e) => host::log(
                Level::Warn,
                "JWKS not usable; keeping the previous keys",
                &[("url", &jwks.url), ("error", &e)],
            ),
        }
    }

    /// How long an admission may be given again for the same token: until the
    /// first millisecond at which `exp` (with the leeway) refuses it, and at most
    /// [`MAX_REUSE`]. Refusals are never given again (a token that is not valid
    /// yet may become valid).
    fn reuse(&self, exp: Option<u64>, now_ms: u64) -> Duration {
        let Some(exp) = exp else {
            return MAX_REUSE;
        };
        let refused_from_ms = exp
            .saturating_add(self.validation.leeway_secs)
            .saturating_add(1)
            .saturating_mul(1000);
        Duration::from_millis(refused_from_ms.saturating_sub(now_ms)).min(MAX_REUSE)
    }

    /// The decision for a request whose token checked out.
    fn admit(&self, verified: &Verified, from: TokenFrom, req: &Request) -> Decision {
        let mut decision = Decision::allow();
        for (header, value) in self.forward_claims.values().zip(&verified.forwarded) {
            // Set from the token or removed, so a client cannot supply its own.
            decision = match value {
                Some(value) => decision.set_header(header, value),
                None => decision.remove_header(header),
            };
        }
        if let TokenFrom::Protocol(entry) = from {
            let rest: Vec<&str> = req.subprotocols().filter(|p| *p != entry).collect();
            decision = match rest.is_empty() {
                true => decision.remove_header("sec-websocket-protocol"),
                false => decision.set_header("sec-websocket-protocol", &rest.join(", ")),
            };
        }
        match &verified.sub {
            Some(sub) => decision.log_field("jwt_sub", sub),
            None => decision,
        }
    }
}

fn unauthorized(reason: &str, code: &str) -> Decision {
    Decision::deny(401, format!("unauthorized: {reason}\n")).set_header(
        "www-authenticate",
        &format!("Bearer error=\"{code}\", error_description=\"{reason}\""),
    )
}

export!(JwtAuth);

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sluice_jwt::mint;
    use sluice_plugin_sdk::testing::{
        init, on_request, refresh_requests, request, reset, set_document, set_now_ms, take_logs,
        watched,
    };

    use super::*;

    const SECRET: &str = "0123456789abcdef-test";
    const EC_PRIVATE: &str = include_str!("../../jwt/testdata/ec_private.pem");
    const EC_PUBLIC: &str = include_str!("../../jwt/testdata/ec_public.pem");

    fn plugin() -> JwtAuth {
        set_now_ms(1_000_000);
        let config = json!({
            "keys": [{"alg": "HS256", "secret": SECRET}, {"alg": "ES256", "public_key_pem": EC_PUBLIC}],
            "issuer": "iss", "audience": "sluice",
            "forward_claims": {"sub": "x-user", "tenant": "x-tenant"}
        });
        init(&config.to_string()).unwrap()
    }

    fn claims() -> serde_json::Value {
        json!({"sub": "alice", "tenant": "acme", "iss": "iss", "aud": "sluice", "exp": 1_100})
    }

    #[test]
    fn bearer_header_admits_and_forwards_claims() {
        let p = plugin();
        let token = mint::hs256(&claims(), SECRET.as_bytes());
        let req = request()
            .header("authorization", &format!("Bearer {token}"))
            .header("x-user", "spoofed")
            .build();
        let d = on_request(&p, &req);
        assert_eq!(d.upstream_header("x-user"), Some("alice"));
        assert_eq!(d.upstream_header("x-tenant"), Some("acme"));
    }

    #[test]
    fn subprotocol_token_is_stripped() {
        let p = plugin();
        let token = mint::es256(&claims(), EC_PRIVATE).unwrap();
        let req = request()
            .header("sec-websocket-protocol", &format!("chat, bearer.{token}"))
            .build();
        let d = on_request(&p, &req);
        assert!(!d.is_deny(), "{d:?}");
        assert_eq!(d.upstream_header("sec-websocket-protocol"), Some("chat"));
    }

    #[test]
    fn query_token_and_missing_claim_removes_header() {
        let p = plugin();
        let mut c = claims();
        c.as_object_mut().unwrap().remove("tenant");
        let token = mint::hs256(&c, SECRET.as_bytes());
        let d = on_request(
            &p,
            &request().path(&format!("/ws?access_token={token}")).build(),
        );
        assert!(!d.is_deny());
        assert!(
            d.header_ops()
                .any(|op| op == sluice_plugin_sdk::HeaderOp::Remove("x-tenant"))
        );
    }

    #[test]
    fn an_admission_may_be_reused_until_exp_refuses_the_token_and_never_a_refusal() {
        let p = plugin();
        let admit = |exp: u64, now_ms: u64| {
            set_now_ms(now_ms);
            let mut c = claims();
            c["exp"] = json!(exp);
            let token = mint::hs256(&c, SECRET.as_bytes());
            let req = request().header("authorization", &format!("Bearer {token}"));
            on_request(&p, &req.build())
        };
        // exp 1,010 s with the default leeway of 30 s: refused from 1,041,000 ms.
        let d = admit(1_010, 1_030_250);
        assert!(!d.is_deny());
        assert_eq!(d.reuse(), Duration::from_millis(10_750));
        assert!(!admit(1_010, 1_040_999).is_deny());
        assert_eq!(admit(1_010, 1_041_000).status(), Some(401));
        // Far from expiry: a minute at most.
        assert_eq!(admit(5_000, 1_000_000).reuse(), Duration::from_secs(60));
        let refused = admit(900, 1_000_000);
        assert_eq!(refused.status(), Some(401));
        assert_eq!(refused.reuse(), Duration::ZERO);
    }

    #[test]
    fn refusals_are_401_with_reason() {
        let p = plugin();
        let missing = on_request(&p, &request().build());
        assert_eq!(missing.status(), Some(401));
        assert!(
            missing
                .response_header("www-authenticate")
                .unwrap()
                .contains("missing token")
        );
        let mut c = claims();
        c["exp"] = json!(900);
        let expired = mint::hs256(&c, SECRET.as_bytes());
        let d = on_request(
            &p,
            &request()
                .header("authorization", &format!("Bearer {expired}"))
                .build(),
        );
        assert_eq!(d.status(), Some(401));
        assert!(
            d.response_header("www-authenticate")
                .unwrap()
                .contains("expired")
        );
        let wrong_key = mint::hs256(&claims(), b"another-secret-of-16");
        let d = on_request(
            &p,
            &request()
                .header("authorization", &format!("Bearer {wrong_key}"))
                .build(),
        );
        assert!(
            d.response_header("www-authenticate")
                .unwrap()
                .contains("bad signature")
        );
    }

    #[test]
    fn a_remembered_token_gets_the_same_answer_and_still_expires() {
        let p = plugin();
        let token = mint::hs256(&claims(), SECRET.as_bytes());
        let req = request()
            .header("authorization", &format!("Bearer {token}"))
            .build();
        let first = on_request(&p, &req);
        assert!(
            p.cache.get(&token).is_some(),
            "a verified token is remembered"
        );
        assert_eq!(
            on_request(&p, &req),
            first,
            "a hit decides as the check did"
        );
        // exp 1,100 plus 30 s leeway: still fine at 1,130 s, refused at 1,131 s.
        set_now_ms(1_130_000);
        assert!(!on_request(&p, &req).is_deny());
        set_now_ms(1_131_000);
        let d = on_request(&p, &req);
        assert_eq!(d.status(), Some(401));
        assert!(
            d.response_header("www-authenticate")
                .unwrap()
                .contains("expired")
        );
    }

    #[test]
    fn refused_tokens_are_not_remembered_and_the_cache_can_be_off() {
        let p = plugin();
        let forged = mint::hs256(&claims(), b"another-secret-of-16");
        let req = request()
            .header("authorization", &format!("Bearer {forged}"))
            .build();
        assert_eq!(on_request(&p, &req).status(), Some(401));
        assert!(p.cache.get(&forged).is_none());
        set_now_ms(1_000_000);
        let off: JwtAuth = init(
            &json!({"keys": [{"alg": "HS256", "secret": SECRET}], "cache_size": 0}).to_string(),
        )
        .unwrap();
        let token = mint::hs256(&claims(), SECRET.as_bytes());
        let req = request()
            .header("authorization", &format!("Bearer {token}"))
            .build();
        assert!(!on_request(&off, &req).is_deny());
        assert!(off.cache.get(&token).is_none());
    }

    const JWKS: &str = "https://idp.test/jwks.json";
    const EC2_PRIVATE: &str = include_str!("../../jwt/testdata/ec2_private.pem");
    const EC2_PUBLIC: &str = include_str!("../../jwt/testdata/ec2_public.pem");

    fn jwks_of(keys: &[(&str, &str)]) -> Vec<u8> {
        mint::jwks(keys).unwrap().to_string().into_bytes()
    }

    #[test]
    fn keys_follow_the_jwks_the_host_fetches() {
        reset();
        set_now_ms(1_000_000);
        set_document(JWKS, &jwks_of(&[(EC_PUBLIC, "a")]));
        let p: JwtAuth = init(&json!({"jwks": {"url": JWKS}}).to_string()).unwrap();
        assert_eq!(watched(), [JWKS]);
        let with = |token: &str| {
            on_request(
                &p,
                &request()
                    .header("authorization", &format!("Bearer {token}"))
                    .build(),
            )
        };
        let a = mint::es256_kid(&claims(), EC_PRIVATE, "a").unwrap();
        let b = mint::es256_kid(&claims(), EC2_PRIVATE, "b").unwrap();
        assert!(!with(&a).is_deny());
        // An unknown key: refused, and an early fetch asked for.
        let refused = with(&b);
        assert_eq!(refused.status(), Some(401));
        assert!(
            refused.body().is_some_and(|b| b.contains("unknown key")),
            "{refused:?}"
        );
        assert_eq!(refresh_requests(JWKS), 1);
        // The provider rotated: b in, a out. a's token was cached, and is refused now.
        set_document(JWKS, &jwks_of(&[(EC2_PUBLIC, "b")]));
        assert!(!with(&b).is_deny());
        assert_eq!(with(&a).status(), Some(401));
        // A copy that is no key set keeps the keys it had.
        set_document(JWKS, b"{\"keys\": \"oops\"}");
        assert!(!with(&b).is_deny());
        assert!(
            take_logs()
                .iter()
                .any(|l| l.message.contains("keeping the previous keys")),
            "the bad copy is logged"
        );
    }

    const DISCOVERY: &str = "https://idp.test/.well-known/openid-configuration";

    #[test]
    fn a_provider_is_found_by_its_discovery_document() {
        reset();
        set_now_ms(1_000_000);
        let provider =
            json!({"issuer": "https://idp.test", "jwks_uri": JWKS, "scopes_supported": []});
        set_document(DISCOVERY, provider.to_string().as_bytes());
        set_document(JWKS, &jwks_of(&[(EC_PUBLIC, "a")]));
        let p: JwtAuth = init(&json!({"jwks": {"discovery": DISCOVERY}}).to_string()).unwrap();
        assert_eq!(watched(), [DISCOVERY, JWKS]);
        // The provider's issuer is the one its tokens must name.
        let status = |iss: &str| {
            let claims = json!({"sub": "alice", "iss": iss, "exp": 1_100});
            let token = mint::es256_kid(&claims, EC_PRIVATE, "a").unwrap();
            let auth = format!("Bearer {token}");
            on_request(&p, &request().header("authorization", &auth).build()).status()
        };
        assert_eq!(status("https://idp.test"), None, "admitted");
        assert_eq!(status("https://elsewhere.test"), Some(401));

        let err = |c: serde_json::Value| init::<JwtAuth>(&c.to_string()).err().unwrap();
        // A config `issuer` the provider does not call itself.
        let other = json!({"jwks": {"discovery": DISCOVERY}, "issuer": "https://other.test"});
        assert!(err(other).contains("not the `issuer`"));
        // Both ways of naming the set, or neither.
        let both = json!({"jwks": {"url": JWKS, "discovery": DISCOVERY}});
        assert!(err(both).contains("by `url` or by `discovery`"));
        assert!(err(json!({"jwks": {}})).contains("by `url` or by `discovery`"));
        // A document that is not a provider's, and one the host could not fetch.
        set_document(DISCOVERY, b"{\"keys\": []}");
        let e = err(json!({"jwks": {"discovery": DISCOVERY}}));
        assert!(
            e.contains("not an OpenID provider's discovery document"),
            "{e}"
        );
        let missing = "https://idp.test/missing/.well-known/openid-configuration";
        let e = err(json!({"jwks": {"discovery": missing}}));
        assert!(e.contains("no good copy"), "{e}");
    }

    #[test]
    fn bad_configs_are_rejected() {
        let err = |c: serde_json::Value| init::<JwtAuth>(&c.to_string()).err().unwrap();
        assert!(err(json!({"keys": []})).contains("at least one key"));
        assert!(err(json!({"keys": [{"alg": "HS256", "secret": "short"}]})).contains("16 bytes"));
        assert!(err(json!({"keys": [{"alg": "RS256", "public_key_pem": "x"}]})).contains("RS256"));
        assert!(err(json!({"keys": [{"alg": "none"}]})).contains("invalid config"));
        assert!(err(json!({})).contains("or `jwks` name a key set"));
        let backwards =
            json!({"jwks": {"url": JWKS, "min_refresh_secs": 60, "max_refresh_secs": 10}});
        assert!(err(backwards).contains("min_refresh_secs"));
        let huge = json!({"keys": [{"alg": "HS256", "secret": SECRET}], "cache_size": 1 << 20});
        assert!(err(huge).contains("cache_size"));
    }
}
