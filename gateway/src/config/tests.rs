//! The config as a user sees it: accepted files and their defaults, and the exact
//! located messages for rejected ones.

use std::time::Duration;

use super::validate::MAX_WORKERS;
use super::*;

const BASE: &str = r#"
[listeners.public]
bind = "127.0.0.1:8080"

[upstreams.echo]
servers = ["127.0.0.1:9001"]

[[routes]]
path_prefix = "/"
upstream = "echo"
"#;

fn err_of(src: &str) -> String {
    Config::parse("sluice.toml", src).unwrap_err().to_string()
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse("sluice.toml", BASE).unwrap();
    assert_eq!(c.listeners[0].max_header_size, 16 * 1024);
    assert_eq!(c.upstreams[0].balance, Balance::LeastConn);
    assert_eq!(c.routes[0].idle_timeout, Some(Duration::from_secs(3600)));
    assert!(c.routes[0].preserve_host);
}

#[test]
fn unknown_field_names_file_line_and_field() {
    let src = BASE.replace("servers = [", "serverz = 1\nservers = [");
    assert_eq!(
        err_of(&src),
        "sluice.toml:6:1: upstreams.echo.serverz: unknown field `serverz`, expected one of `servers`, `balance`, `hash_key`, `connect_timeout`, `max_fails`, `fail_timeout`, `health`, `tls`"
    );
}

#[test]
fn bad_duration_names_the_field() {
    let src = format!("{BASE}idle_timeout = \"3 weeks\"\n");
    assert_eq!(
        err_of(&src),
        "sluice.toml:11:16: routes[0].idle_timeout: expected a duration such as \"30s\", \"500ms\" or \"1h\", got \"3 weeks\""
    );
}

#[test]
fn unknown_upstream_is_reported_at_its_use() {
    let src = format!("{BASE}\n[[routes]]\npath_prefix = \"/x\"\nupstream = \"nope\"\n");
    assert_eq!(
        err_of(&src),
        "sluice.toml:14:12: routes[1].upstream: unknown upstream `nope` (defined: echo)"
    );
}

#[test]
fn bad_hash_key_and_sizes() {
    let src = BASE.replace(
        "servers = [\"127.0.0.1:9001\"]",
        "servers = [\"127.0.0.1:9001\"]\nbalance = \"hash\"\nhash_key = \"body:x\"",
    );
    assert!(err_of(&src).starts_with("sluice.toml:8:12: upstreams.echo.hash_key: expected"));
    let src = BASE.replace(
        "bind = \"127.0.0.1:8080\"",
        "bind = \"127.0.0.1:8080\"\nmax_header_size = \"1KiB\"",
    );
    assert_eq!(
        err_of(&src),
        "sluice.toml:4:19: listeners.public.max_header_size: must be between 8KiB and 1MiB"
    );
}

#[test]
fn workers_default_within_bounds_and_explicit_ones_are_kept_or_refused() {
    let workers = |runtime: &str| {
        Config::parse("sluice.toml", &format!("{runtime}{BASE}"))
            .unwrap()
            .workers
    };
    let default = workers("");
    assert!(
        (1..=MAX_WORKERS as usize).contains(&default),
        "default workers {default}"
    );
    assert_eq!(workers("[runtime]\nworkers = 3\n"), 3);
    assert_eq!(workers("[runtime]\nworkers = 1024\n"), 1024);
    for (n, message) in [
        ("0", "must be between 1 and 1024"),
        ("1025", "must be between 1 and 1024"),
        ("-1", "invalid value: integer `-1`, expected u64"),
    ] {
        assert_eq!(
            err_of(&format!("[runtime]\nworkers = {n}\n{BASE}")),
            format!("sluice.toml:2:11: runtime.workers: {message}")
        );
    }
}

#[test]
fn reused_decisions_default_can_be_turned_off_and_are_bounded() {
    let with = |line: &str| format!("{BASE}\n[plugins.p]\npath = \"p.wasm\"\n{line}\n");
    let limits = |src: &str| Config::parse("sluice.toml", src).unwrap().plugins[0].limits;
    assert_eq!(limits(&with("")).max_reused, 1024);
    assert_eq!(limits(&with("max_reused = 0")).max_reused, 0);
    assert_eq!(
        err_of(&with("max_reused = 70000")),
        "sluice.toml:14:14: plugins.p.max_reused: must be at most 65536 (0 turns reuse off)"
    );
}

#[test]
fn grants_are_absolute_http_urls_each_once() {
    let with = |grants: &str| {
        format!("{BASE}\n[plugins.p]\npath = \"p.wasm\"\ngrants = {{ http = [{grants}] }}\n")
    };
    let granted = |src: &str| {
        Config::parse("sluice.toml", src).unwrap().plugins[0]
            .grants
            .clone()
    };
    let url = "\"https://idp.example/.well-known/jwks.json\"";
    assert_eq!(
        granted(&with(url)),
        ["https://idp.example/.well-known/jwks.json"]
    );
    assert!(granted(&format!("{BASE}\n[plugins.p]\npath = \"p.wasm\"\n")).is_empty());
    for (bad, message) in [
        (
            "\"ftp://idp.example/k\"",
            "must be an http:// or https:// URL",
        ),
        ("\"/jwks.json\"", "must be an http:// or https:// URL"),
        (
            "\"https://user:pw@idp.example/k\"",
            "must not carry user info",
        ),
        ("\"not a url\"", "not a URL"),
        (&format!("{url}, {url}"), "is granted twice"),
    ] {
        let err = err_of(&with(bad));
        assert!(
            err.starts_with("sluice.toml:14:")
                && err.contains("plugins.p.grants.http")
                && err.contains(message),
            "{bad}: {err}"
        );
    }
    assert!(err_of(&with("\"x\"], ftp = [\"y\"")).contains("unknown field `ftp`"));
}

#[test]
fn durations_past_365_days_are_located_errors_not_panics() {
    for (duration, line) in [
        ("18446744073709551615s1s", 11),
        ("9999999999999999h", 11),
        ("99999999999999999999ms", 11),
        ("366d", 11),
    ] {
        assert_eq!(
            err_of(&format!("{BASE}idle_timeout = \"{duration}\"\n")),
            format!(
                "sluice.toml:{line}:16: routes[0].idle_timeout: must be at most 365d, got \"{duration}\""
            )
        );
    }
    assert_eq!(
        err_of(&format!(
            "[shutdown]\ngrace = \"9999999999999999h\"\n{BASE}"
        )),
        "sluice.toml:2:9: shutdown.grace: must be at most 365d, got \"9999999999999999h\""
    );
    let c = Config::parse("sluice.toml", &format!("{BASE}idle_timeout = \"365d\"\n")).unwrap();
    assert_eq!(c.routes[0].idle_timeout, Some(MAX_DURATION));
}

#[test]
fn sizes_past_one_tebibyte_are_located_errors_not_panics() {
    let with = |size: &str| {
        err_of(&BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            &format!("bind = \"127.0.0.1:8080\"\nmax_header_size = {size}"),
        ))
    };
    assert_eq!(
        with("\"99999999999999999GiB\""),
        "sluice.toml:4:19: listeners.public.max_header_size: must be at most 1TiB, got \"99999999999999999GiB\""
    );
    assert_eq!(
        with("\"99999999999999999999999\""),
        "sluice.toml:4:19: listeners.public.max_header_size: must be at most 1TiB, got \"99999999999999999999999\""
    );
    assert_eq!(
        with("9223372036854775807"),
        "sluice.toml:4:19: listeners.public.max_header_size: must be at most 1TiB, got 9223372036854775807"
    );
    assert_eq!(
        with("-1"),
        "sluice.toml:4:19: listeners.public.max_header_size: expected a size such as \"16KiB\" or \"1MiB\", got -1"
    );
    assert_eq!(
        with("true"),
        "sluice.toml:4:19: listeners.public.max_header_size: invalid type: boolean `true`, expected a size such as \"16KiB\" or a number of bytes"
    );
    // Within the bound, the field's own range still applies.
    assert_eq!(
        with("\"1TiB\""),
        "sluice.toml:4:19: listeners.public.max_header_size: must be between 8KiB and 1MiB"
    );
    assert_eq!(
        err_of(&format!(
            "{BASE}\n[plugins.p]\npath = \"p.wasm\"\nmemory = \"18446744073709551615GB\"\n"
        )),
        "sluice.toml:14:10: plugins.p.memory: must be at most 1TiB, got \"18446744073709551615GB\""
    );
}

#[test]
fn max_connections_is_bounded() {
    let with = |n: &str| {
        BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            &format!("bind = \"127.0.0.1:8080\"\nmax_connections = {n}"),
        )
    };
    let c = Config::parse("sluice.toml", &with("10000000")).unwrap();
    assert_eq!(c.listeners[0].max_connections, 10_000_000);
    for n in ["0", "10000001", "4611686018427387904"] {
        assert_eq!(
            err_of(&with(n)),
            "sluice.toml:4:19: listeners.public.max_connections: must be between 1 and 10000000"
        );
    }
}

#[test]
fn an_element_of_a_multi_line_array_is_named_by_its_index() {
    let src = BASE.replace(
        "servers = [\"127.0.0.1:9001\"]",
        "servers = [\n  \"127.0.0.1:9001\",\n  \"host:port\",\n]",
    );
    assert_eq!(
        err_of(&src),
        "sluice.toml:8:3: upstreams.echo.servers[1]: expected \"host:port\" that resolves, got \"host:port\""
    );
}

#[test]
fn inline_tables_and_dotted_keys_are_named_by_their_full_path() {
    let upstream = |health: &str| {
        BASE.replace(
            "servers = [\"127.0.0.1:9001\"]",
            &format!("servers = [\"127.0.0.1:9001\"]\n{health}"),
        )
    };
    assert_eq!(
        err_of(&upstream("health = { check = \"ping\" }")),
        "sluice.toml:7:20: upstreams.echo.health.check: expected \"tcp\" or \"http\", got \"ping\""
    );
    assert_eq!(
        err_of(&upstream(
            "health.check = \"tcp\"\nhealth.interval = \"soon\""
        )),
        "sluice.toml:8:19: upstreams.echo.health.interval: expected a duration such as \"30s\", \"500ms\" or \"1h\", got \"soon\""
    );
    assert_eq!(
        err_of(&upstream("health = { check = \"tcp\", rise = 0 }")),
        "sluice.toml:7:34: upstreams.echo.health.rise: must be at least 1"
    );
}

#[test]
fn routes_are_named_by_their_index_however_they_are_written() {
    let three = format!(
        "{BASE}\n[[routes]]\npath_prefix = \"/a\"\nupstream = \"echo\"\n\n[[routes]]\npath_prefix = \"b\"\nupstream = \"echo\"\n"
    );
    assert_eq!(
        err_of(&three),
        "sluice.toml:17:15: routes[2].path_prefix: must start with '/', got \"b\""
    );
    let inline = "[listeners.public]\nbind = \"127.0.0.1:8080\"\n[upstreams.echo]\nservers = [\"127.0.0.1:9001\"]\n\
                  routes = [\n  { upstream = \"echo\" },\n  { upstream = \"echo\", listeners = [\"public\", \"admin\"] },\n]\n";
    // `routes` written inline belongs to the table before it, as TOML reads it.
    assert_eq!(
        err_of(inline),
        "sluice.toml:5:1: upstreams.echo.routes: unknown field `routes`, expected one of `servers`, `balance`, `hash_key`, `connect_timeout`, `max_fails`, `fail_timeout`, `health`, `tls`"
    );
    let inline = inline.replace("[upstreams.echo]\nservers = [\"127.0.0.1:9001\"]\n", "")
        + "[upstreams.echo]\nservers = [\"127.0.0.1:9001\"]\n";
    let inline = inline.replace("[listeners.public]\nbind = \"127.0.0.1:8080\"\n", "")
        + "[listeners.public]\nbind = \"127.0.0.1:8080\"\n";
    assert_eq!(
        err_of(&inline),
        "sluice.toml:3:47: routes[1].listeners[1]: unknown listener `admin` (defined: public)"
    );
}

#[test]
fn a_table_is_named_by_its_header_and_the_whole_file_as_top_level() {
    let src = BASE.replace("[listeners.public]", "[listeners.\"pub lic\"]");
    assert_eq!(
        err_of(&src),
        "sluice.toml:2:1: listeners.\"pub lic\": names use letters, digits, '-' and '_', got \"pub lic\""
    );
    let src = BASE.replace(
        "[upstreams.echo]\nservers = [\"127.0.0.1:9001\"]\n",
        "[upstreams.echo]\n",
    );
    assert_eq!(
        err_of(&src),
        "sluice.toml:5:1: upstreams.echo: missing field `servers`"
    );
    let routeless = &BASE[..BASE.find("[[routes]]").unwrap()];
    assert_eq!(
        err_of(routeless),
        "sluice.toml:1:1: (top level): at least one [[routes]] entry is required"
    );
}

#[test]
fn syntax_errors_name_the_field_they_are_in() {
    let src = BASE.replace("bind = \"127.0.0.1:8080\"", "bind = \"127.0.0.1:8080");
    assert!(
        err_of(&src).starts_with("sluice.toml:3:23: listeners.public.bind: "),
        "{}",
        err_of(&src)
    );
    let src = BASE.replace(
        "upstream = \"echo\"",
        "upstream = \"echo\"\nupstream = \"echo\"",
    );
    assert!(
        err_of(&src).starts_with("sluice.toml:11:1: routes[0]: duplicate key"),
        "{}",
        err_of(&src)
    );
}

#[test]
fn routes_forward_the_path_as_sent_unless_asked_to_normalise_it() {
    let with = |line: &str| format!("{BASE}{line}\n");
    assert!(!Config::parse("sluice.toml", BASE).unwrap().routes[0].normalize_path);
    let c = Config::parse("sluice.toml", &with("normalize_path = true")).unwrap();
    assert!(c.routes[0].normalize_path);
    assert_eq!(
        err_of(&with("normalize_path = \"yes\"")),
        "sluice.toml:11:18: routes[0].normalize_path: invalid type: string \"yes\", expected a boolean"
    );
}

/// TLS files made at test time in a fresh directory, and config text that names them.
mod tls_files {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    pub(super) struct Dir(pub(super) PathBuf);

    impl Dir {
        pub(super) fn new() -> Dir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "sluice-config-tls-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        pub(super) fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }

        /// Parses `src` as `DIR/sluice.toml`, so relative paths are the directory's.
        pub(super) fn parse(&self, src: &str) -> Result<Config, ConfigError> {
            let file = self.0.join("sluice.toml");
            Config::parse(&file.display().to_string(), src)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for `names`, valid from `from` to `to` days from now,
    /// with its key: (certificate PEM, key PEM).
    pub(super) fn cert(names: &[&str], from: i64, to: i64) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        let now = std::time::SystemTime::now();
        let day = Duration::from_secs(86_400);
        let at = |d: i64| {
            if d < 0 {
                now - day * d.unsigned_abs() as u32
            } else {
                now + day * d as u32
            }
        };
        params.not_before = at(from).into();
        params.not_after = at(to).into();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// BASE with a TLS table on `public` holding `tls` lines.
    pub(super) fn with_tls(tls: &str) -> String {
        BASE.replace(
            "bind = \"127.0.0.1:8080\"\n",
            &format!("bind = \"127.0.0.1:8080\"\n[listeners.public.tls]\n{tls}\n"),
        )
    }
}

#[test]
fn proxy_protocol_takes_addresses_and_ranges() {
    let with = |list: &str| {
        BASE.replace(
            "bind = \"127.0.0.1:8080\"\n",
            &format!("bind = \"127.0.0.1:8080\"\nproxy_protocol = {list}\n"),
        )
    };
    let c = Config::parse("sluice.toml", &with("[\"10.0.0.0/8\", \"::1\"]")).unwrap();
    let nets: Vec<String> = c.listeners[0]
        .proxy_protocol
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "::1/128"]);
    assert!(
        Config::parse("sluice.toml", BASE).unwrap().listeners[0]
            .proxy_protocol
            .is_empty()
    );
    assert_eq!(
        err_of(&with("[\"10.0.0.0/8\", \"lb.example\"]")),
        "sluice.toml:4:33: listeners.public.proxy_protocol[1]: expected an IP address or range such as \"10.0.0.0/8\", got \"lb.example\""
    );
}

#[test]
fn http2_is_on_for_tls_listeners_off_for_plain_ones_and_bounded() {
    let dir = tls_files::Dir::new();
    let (cert, key) = tls_files::cert(&["a.test"], -1, 30);
    dir.write("a.pem", &cert);
    dir.write("a-key.pem", &key);
    let tls = tls_files::with_tls("certificates = [{ cert = \"a.pem\", key = \"a-key.pem\" }]");
    let c = dir.parse(&tls).unwrap();
    assert_eq!(c.listeners[0].http2, Some(Http2Config::DEFAULT));
    let off = dir
        .parse(&format!(
            "{tls}\n[listeners.public.http2]\nenabled = false\n"
        ))
        .unwrap();
    assert_eq!(off.listeners[0].http2, None);
    // Plain: off unless asked for (h2c by prior knowledge).
    assert_eq!(
        Config::parse("sluice.toml", BASE).unwrap().listeners[0].http2,
        None
    );
    let h2c = BASE.to_string()
        + "[listeners.public.http2]\nenabled = true\nmax_concurrent_streams = 10\n";
    let h2c = Config::parse("sluice.toml", &h2c).unwrap().listeners[0]
        .http2
        .clone()
        .unwrap();
    assert_eq!(h2c.max_concurrent_streams, 10);
    assert_eq!(
        h2c.connection_window,
        10 * h2c.stream_window,
        "room for every stream"
    );
    for (field, value, message) in [
        ("max_concurrent_streams", "0", "must be between 1 and 10000"),
        ("max_reset_rate", "0", "must be between 1 and 100000"),
        (
            "stream_window",
            "\"1KiB\"",
            "must be between 16KiB and 1GiB",
        ),
        (
            "max_send_buffer",
            "\"2GiB\"",
            "must be between 16KiB and 1GiB",
        ),
    ] {
        let src = format!("{BASE}[listeners.public.http2]\n{field} = {value}\n");
        let e = err_of(&src);
        assert!(
            e.starts_with("sluice.toml:")
                && e.contains(&format!("listeners.public.http2.{field}: {message}")),
            "{e}"
        );
    }
    let e = err_of(&format!(
        "{BASE}[listeners.public.http2]\nstream_window = \"1MiB\"\nconnection_window = \"64KiB\"\n"
    ));
    assert!(
        e.contains("connection_window: must be at least stream_window (1048576 bytes)"),
        "{e}"
    );
}

#[test]
fn a_tls_listener_reads_its_certificates_and_names_them_by_san() {
    let dir = tls_files::Dir::new();
    let (cert, key) = tls_files::cert(&["a.test", "*.b.test"], -1, 30);
    dir.write("a.pem", &cert);
    dir.write("a-key.pem", &key);
    let (cert, key) = tls_files::cert(&["c.test"], -1, 30);
    dir.write("c.pem", &cert);
    dir.write("c-key.pem", &key);
    let c = dir
        .parse(&tls_files::with_tls(
            "certificates = [{ cert = \"a.pem\", key = \"a-key.pem\" }, \
             { cert = \"c.pem\", key = \"c-key.pem\", names = [\"C.Test\", \"*.d.test\"] }]",
        ))
        .unwrap();
    let tls = c.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.certificates[0].names, ["a.test", "*.b.test"]);
    assert_eq!(tls.certificates[1].names, ["c.test", "*.d.test"]);
    assert_eq!(tls.unknown_name, UnknownName::Default);
    assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
    assert!(matches!(tls.client_auth, ClientAuth::None));
}

#[test]
fn bad_tls_files_are_errors_naming_the_file_and_the_listener() {
    let dir = tls_files::Dir::new();
    let (cert, key) = tls_files::cert(&["a.test"], -1, 30);
    dir.write("a.pem", &cert);
    dir.write("a-key.pem", &key);
    let (_, other_key) = tls_files::cert(&["x.test"], -1, 30);
    dir.write("other-key.pem", &other_key);
    let (old, old_key) = tls_files::cert(&["old.test"], -30, -1);
    dir.write("old.pem", &old);
    dir.write("old-key.pem", &old_key);
    dir.write("junk.pem", "not pem at all\n");
    let d = dir.0.display();
    let pair = |c: &str, k: &str| format!("certificates = [{{ cert = \"{c}\", key = \"{k}\" }}]");
    let cases = [
        (
            pair("missing.pem", "a-key.pem"),
            format!("listeners.public.tls.certificates[0].cert: {d}/missing.pem: cannot read"),
        ),
        (
            pair("a.pem", "missing-key.pem"),
            format!("listeners.public.tls.certificates[0].key: {d}/missing-key.pem: cannot read"),
        ),
        (
            pair("junk.pem", "a-key.pem"),
            format!(
                "listeners.public.tls.certificates[0].cert: {d}/junk.pem: no CERTIFICATE block"
            ),
        ),
        (
            pair("a.pem", "other-key.pem"),
            format!(
                "listeners.public.tls.certificates[0].key: {d}/other-key.pem: this key does \
                 not fit the certificate in {d}/a.pem"
            ),
        ),
        (
            pair("old.pem", "old-key.pem"),
            format!(
                "listeners.public.tls.certificates[0].cert: {d}/old.pem: the certificate \
                 expired on"
            ),
        ),
        (
            pair("/dev/zero", "a-key.pem"),
            "listeners.public.tls.certificates[0].cert: /dev/zero: cannot read: not a regular file"
                .to_string(),
        ),
        (
            "certificates = []".to_string(),
            "listeners.public.tls.certificates: at least one { cert, key } pair".to_string(),
        ),
        (
            format!("{}\nclient_auth = \"required\"", pair("a.pem", "a-key.pem")),
            "listeners.public.tls.client_auth: client certificates need `client_ca`".to_string(),
        ),
        (
            format!("{}\nunknown_name = \"ignore\"", pair("a.pem", "a-key.pem")),
            "listeners.public.tls.unknown_name: expected \"default\" or \"refuse\"".to_string(),
        ),
        (
            "certificates = [{ cert = \"a.pem\", key = \"a-key.pem\", names = [\"a b\"] }]"
                .to_string(),
            "listeners.public.tls.certificates[0].names[0]: expected a DNS name".to_string(),
        ),
    ];
    for (tls, expected) in cases {
        let err = dir
            .parse(&tls_files::with_tls(&tls))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&expected),
            "{tls}\n got: {err}\nwant: {expected}"
        );
        assert!(err.starts_with(&format!("{d}/sluice.toml:")), "{err}");
    }
}

#[test]
fn upstream_servers_say_tls_by_scheme_or_by_the_pool_table() {
    let src = BASE.replace(
        "servers = [\"127.0.0.1:9001\"]",
        "servers = [\"wss://127.0.0.1\", \"ws://127.0.0.1\", \"https://127.0.0.1:8443/\", \"127.0.0.1:9001\"]",
    );
    let c = Config::parse("sluice.toml", &src).unwrap();
    let servers: Vec<(&str, bool)> = c.upstreams[0]
        .servers
        .iter()
        .map(|s| (s.authority.as_str(), s.tls))
        .collect();
    assert_eq!(
        servers,
        [
            ("127.0.0.1:443", true),
            ("127.0.0.1:80", false),
            ("127.0.0.1:8443", true),
            ("127.0.0.1:9001", false),
        ]
    );
    assert!(c.upstreams[0].tls.is_some());

    // A `tls` table makes scheme-less servers TLS; `ws://` stays plain.
    let src = BASE.replace(
        "servers = [\"127.0.0.1:9001\"]",
        "servers = [\"127.0.0.1:9001\", \"ws://127.0.0.1:9002\"]\n\
         [upstreams.echo.tls]\nserver_name = \"backend.internal\"",
    );
    let c = Config::parse("sluice.toml", &src).unwrap();
    assert!(c.upstreams[0].servers[0].tls);
    assert!(!c.upstreams[0].servers[1].tls);

    for (server, field) in [
        ("ftp://127.0.0.1:21", "upstreams.echo.servers[0]"),
        ("wss://user@127.0.0.1", "upstreams.echo.servers[0]"),
    ] {
        let src = BASE.replace("\"127.0.0.1:9001\"", &format!("{server:?}"));
        let err = err_of(&src);
        assert!(err.contains(field), "{server}: {err}");
    }
    let src = BASE.replace(
        "servers = [\"127.0.0.1:9001\"]",
        "servers = [\"127.0.0.1:9001\"]\n[upstreams.echo.tls]\nclient_cert = \"c.pem\"",
    );
    assert!(
        err_of(&src).contains("upstreams.echo.tls.client_cert: client_cert needs client_key"),
        "{}",
        err_of(&src)
    );
}

#[test]
fn the_admin_listener_is_loopback_unless_a_token_guards_it() {
    let dir = tls_files::Dir::new();
    let c = dir
        .parse(&format!("{BASE}[admin]\nbind = \"127.0.0.1:9901\"\n"))
        .unwrap();
    let admin = c.admin.expect("admin");
    assert_eq!((admin.bind.port(), admin.token), (9901, None));
    assert_eq!(
        dir.parse(&format!("{BASE}[admin]\nbind = \"0.0.0.0:9901\"\n"))
            .unwrap_err()
            .to_string()
            .split_once(": ")
            .map(|(_, rest)| rest.to_owned())
            .unwrap(),
        "admin.bind: 0.0.0.0:9901 is not a loopback address: an admin listener reachable \
         from other hosts needs `token_file`"
    );
    dir.write(
        "admin.token",
        "0123456789abcdef-token\nsecond line ignored\n",
    );
    let c = dir
        .parse(&format!(
            "{BASE}[admin]\nbind = \"0.0.0.0:9901\"\ntoken_file = \"admin.token\"\n"
        ))
        .unwrap();
    assert_eq!(
        c.admin.unwrap().token.as_deref(),
        Some("0123456789abcdef-token")
    );
    dir.write("short.token", "guessable\n");
    for (file, why) in [
        ("short.token", "at least 16 visible ASCII characters"),
        ("missing.token", "cannot read"),
    ] {
        let e = dir
            .parse(&format!(
                "{BASE}[admin]\nbind = \"127.0.0.1:9901\"\ntoken_file = \"{file}\"\n"
            ))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin.token_file: ") && e.contains(file) && e.contains(why),
            "{e}"
        );
    }
}

#[test]
fn reload_and_access_log_settings_default_and_resolve_against_the_file() {
    let c = Config::parse("conf/sluice.toml", BASE).unwrap();
    assert_eq!(
        c.reload,
        ReloadConfig {
            watch: true,
            debounce: Duration::from_millis(250)
        }
    );
    assert_eq!(c.log.access_file, None);
    let src = format!(
        "[log]\naccess_file = \"logs/access.log\"\n[reload]\nwatch = false\ndebounce = \"1s\"\n{BASE}"
    );
    let c = Config::parse("conf/sluice.toml", &src).unwrap();
    assert_eq!(
        c.log.access_file.as_deref(),
        Some(std::path::Path::new("conf/logs/access.log"))
    );
    assert!(!c.reload.watch);
    assert_eq!(c.reload.debounce, Duration::from_secs(1));
    assert!(err_of(&format!("[reload]\ndebounce = \"0s\"\n{BASE}")).contains("reload.debounce"));
}

#[test]
fn tenants_group_routes_by_host_and_their_limits_are_checked_where_written() {
    let src = format!(
        "{BASE}
[tenants.acme]
hosts = [\"acme.example\"]
[tenants.acme.limits]
tunnels = 10
handshakes = {{ rate = 0.5 }}
bandwidth = \"1MiB\"
[tenants.acme.per_ip]
requests = {{ rate = 20, burst = 40 }}

[[routes]]
host = \"acme.example\"
upstream = \"echo\"

[[routes]]
host = \"acme.example\"
path_prefix = \"/other\"
upstream = \"echo\"
tenant = \"globex\"
"
    );
    let c = Config::parse("sluice.toml", &src).unwrap();
    let t = &c.tenants[0];
    assert_eq!(t.limits.tunnels, Some(10));
    // The burst defaults to one second's worth, and at least one.
    assert_eq!(
        t.limits.handshakes,
        Some(Rate {
            per_second: 0.5,
            burst: 1
        })
    );
    assert_eq!(t.limits.bandwidth, Some(1 << 20));
    assert_eq!(
        t.per_ip.as_ref().and_then(|l| l.requests.map(|r| r.burst)),
        Some(40)
    );
    let tenants: Vec<_> = c.routes.iter().map(|r| r.tenant.as_deref()).collect();
    assert_eq!(tenants[tenants.len() - 2..], [Some("acme"), Some("globex")]);
    assert_eq!(c.max_clients, DEFAULT_MAX_CLIENTS);
    assert!(c.cluster.is_none());

    let bad = |table: &str| err_of(&format!("{BASE}\n{table}"));
    assert!(
        bad("[tenants.a.limits]\nhandshakes = { rate = 0 }").ends_with(
            "tenants.a.limits.handshakes.rate: must be above 0 and at most 1000000 per second"
        ),
        "{}",
        bad("[tenants.a.limits]\nhandshakes = { rate = 0 }")
    );
    assert!(
        bad("[tenants.a.limits]\ntunnels = 0")
            .contains("tenants.a.limits.tunnels: must be between 1")
    );
    assert!(
        bad("[tenants.a.per_ip]\nbandwidth = \"100\"")
            .contains("tenants.a.per_ip.bandwidth: must be at least 1KiB")
    );
    assert!(
        bad("[tenants.a]\nhosts = [\"a/b\"]").contains("tenants.a.hosts[0]: expected a host name")
    );
    assert!(bad("[limits]\nmax_clients = 0").contains("limits.max_clients: must be between 1"));
}

#[test]
fn the_cluster_takes_a_redis_url_and_a_failure_mode() {
    let c = Config::parse(
        "sluice.toml",
        &format!("{BASE}\n[cluster]\nredis = \"redis://127.0.0.1:6379\"\non_failure = \"closed\"\nlease = \"3s\""),
    )
    .unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!(cluster.on_failure, OnFailure::Closed);
    assert_eq!(cluster.lease, Duration::from_secs(3));
    assert_eq!(cluster.timeout, Duration::from_millis(100));
    let bad = |table: &str| err_of(&format!("{BASE}\n[cluster]\n{table}"));
    assert!(bad("redis = \"http://x\"").contains("cluster.redis: expected a URL such as"));
    assert!(bad("redis = \"rediss://x:6380\"").contains("cluster.redis: expected a URL such as"));
    assert!(
        bad("redis = \"redis://x\"\non_failure = \"maybe\"")
            .contains("cluster.on_failure: expected \"open\" or \"closed\", got \"maybe\"")
    );
}

#[test]
fn trusted_proxies_and_listener_per_ip_limits() {
    let src = BASE.replace(
        "bind = \"127.0.0.1:8080\"\n",
        "bind = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.0/8\"]\nper_ip = { tunnels = 3 }\n",
    );
    let c = Config::parse("sluice.toml", &src).unwrap();
    assert_eq!(c.listeners[0].trusted_proxies[0].to_string(), "10.0.0.0/8");
    assert_eq!(c.listeners[0].per_ip.tunnels, Some(3));
    let bad = BASE.replace(
        "bind = \"127.0.0.1:8080\"\n",
        "bind = \"127.0.0.1:8080\"\ntrusted_proxies = [\"proxy\"]\n",
    );
    assert!(err_of(&bad).contains("listeners.public.trusted_proxies[0]: expected an IP address"));
}

#[test]
fn capture_is_off_by_default_and_redacts_credentials_unless_told_otherwise() {
    let c = Config::parse("conf/sluice.toml", BASE).unwrap();
    assert_eq!(c.routes[0].capture, None);
    let src = format!("{BASE}[routes.capture]\nfile = \"captures/ws.jsonl\"\n");
    let c = Config::parse("conf/sluice.toml", &src).unwrap();
    assert_eq!(
        c.routes[0].capture,
        Some(CaptureConfig {
            file: "conf/captures/ws.jsonl".into(),
            redact: vec![
                "authorization".into(),
                "cookie".into(),
                "proxy-authorization".into()
            ],
            max_size: 64 << 20,
        })
    );
    let src = format!(
        "{BASE}capture = {{ file = \"/tmp/c.jsonl\", redact = [\"X-Api-Key\", \"x-api-key\"], max_size = \"1MiB\" }}\n"
    );
    let capture = Config::parse("sluice.toml", &src).unwrap().routes[0]
        .capture
        .clone()
        .unwrap();
    assert_eq!(capture.file, std::path::Path::new("/tmp/c.jsonl"));
    assert_eq!(capture.redact, vec!["x-api-key".to_string()]);
    assert_eq!(capture.max_size, 1 << 20);
    let src = format!("{BASE}capture = {{ file = \"c.jsonl\", redact = [] }}\n");
    let c = Config::parse("sluice.toml", &src).unwrap();
    assert!(c.routes[0].capture.as_ref().unwrap().redact.is_empty());
}

#[test]
fn capture_errors_are_located() {
    let at = |extra: &str| err_of(&format!("{BASE}{extra}"));
    assert_eq!(
        at("[routes.capture]\nfile = \"c.jsonl\"\nsample = 2\n"),
        "sluice.toml:13:1: routes[0].capture.sample: unknown field `sample`, expected one of `file`, `redact`, `max_size`"
    );
    assert_eq!(
        at("[routes.capture]\nfile = \"c.jsonl\"\nredact = [\"bad name\"]\n"),
        "sluice.toml:13:11: routes[0].capture.redact[0]: expected a header name, got \"bad name\""
    );
    assert_eq!(
        at("[routes.capture]\nfile = \"c.jsonl\"\nmax_size = \"1KiB\"\n"),
        "sluice.toml:13:12: routes[0].capture.max_size: must be at least 4KiB"
    );
    assert_eq!(
        at("[routes.capture]\nfile = \"\"\n"),
        "sluice.toml:12:8: routes[0].capture.file: expected a file path"
    );
    assert_eq!(
        at(
            "[routes.capture]\nfile = \"c.jsonl\"\n\n[[routes]]\npath_prefix = \"/x\"\nstatus = 403\ncapture = { file = \"d.jsonl\" }\n"
        ),
        "sluice.toml:17:11: routes[1].capture: capture needs a route with `upstream`: a fixed answer runs no plugins"
    );
    assert_eq!(
        at(
            "[routes.capture]\nfile = \"c.jsonl\"\n\n[[routes]]\npath_prefix = \"/x\"\nupstream = \"echo\"\ncapture = { file = \"./c.jsonl\" }\n"
        ),
        "sluice.toml:17:20: routes[1].capture.file: ./c.jsonl is already the capture file of route `*/`; each route needs its own"
    );
}
