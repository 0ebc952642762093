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
        "sluice.toml:6:1: upstreams.echo.serverz: unknown field `serverz`, expected one of `servers`, `balance`, `hash_key`, `connect_timeout`, `max_fails`, `fail_timeout`, `health`"
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
        "sluice.toml:5:1: upstreams.echo.routes: unknown field `routes`, expected one of `servers`, `balance`, `hash_key`, `connect_timeout`, `max_fails`, `fail_timeout`, `health`"
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
