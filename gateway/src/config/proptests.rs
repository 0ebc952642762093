//! Property tests: no duration, size or document, however malformed, panics the parser.
//! Documents are built from the real tables and keys, with values of each field's type
//! that name the tables the document defines, and a per-document share of malformed or
//! mistyped ones, so that most of them get past serde and through validation.

use std::sync::Arc;

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, subsequence};

use super::*;

/// Strings the validation treats specially, valid for some fields and not for others;
/// none names a host that would need a DNS lookup (an IP literal resolves without one,
/// a bad port fails before one).
const WORDS: &[&str] = &[
    "",
    "0",
    "10s",
    "127.0.0.1:8080",
    "0.0.0.0:99999",
    "host:port",
    "a/b",
    "yaml",
    "udp",
    "body:x",
    "cookie:",
    "public",
    "echo",
    "bad name",
    "/",
    "ws",
    "*.example.com",
    "hash",
    "client-ip",
    "header:x-user",
    "tcp",
    "http",
    "info",
    "[",
    "json",
    "p.wasm",
];

/// Names of listeners, upstreams and plugins as a reference may give them, defined or not.
const NAMES: &[&str] = &["public", "admin", "echo", "other", "p", "bad name", ""];

/// Names the generated tables are given (each at most once per kind).
const TABLE_NAMES: &[&str] = &["public", "admin", "echo", "other", "p"];

/// Server addresses: resolvable without DNS, or refused before a lookup. The first four
/// are valid.
const SERVERS: &[&str] = &[
    "127.0.0.1:9001",
    "127.0.0.1:9002",
    "[::1]:9001",
    "127.0.0.1:0",
    "host:port",
    "nocolon",
    "",
];

/// The kinds of table a route refers to.
#[derive(Debug, Clone, Copy)]
enum Table {
    Listener,
    Upstream,
    Plugin,
}

/// What a field holds, and so what a plausible value for it looks like.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Duration,
    Size,
    Integer,
    /// An HTTP status code.
    Status,
    Bool,
    /// A string, plausibly one of these.
    Text(&'static [&'static str]),
    /// An array of strings, plausibly some of these.
    Texts(&'static [&'static str]),
    /// The name of a table.
    Ref(Table),
    /// An array of names of tables.
    Refs(Table),
    Servers,
    /// A token bucket: `{ rate = N, burst = M }`.
    Rate,
}

/// A table's fields: those it must have, and those it may.
type Fields = (
    &'static [(&'static str, Kind)],
    &'static [(&'static str, Kind)],
);

const LOG: Fields = (
    &[],
    &[
        ("level", Kind::Text(&["info", "sluice=debug,warn", "warn"])),
        ("format", Kind::Text(&["text", "json"])),
        (
            "access_file",
            Kind::Text(&["access.log", "logs/access.log"]),
        ),
    ],
);
const ADMIN: Fields = (
    &[(
        "bind",
        Kind::Text(&["127.0.0.1:0", "[::1]:0", "0.0.0.0:9901"]),
    )],
    &[("token_file", Kind::Text(&["admin.token", "/dev/zero"]))],
);
const RELOAD: Fields = (&[], &[("watch", Kind::Bool), ("debounce", Kind::Duration)]);
const SHUTDOWN: Fields = (&[], &[("grace", Kind::Duration)]);
const RUNTIME: Fields = (&[], &[("workers", Kind::Integer)]);
const LISTENER: Fields = (
    &[("bind", Kind::Text(&["127.0.0.1:0", "[::1]:0"]))],
    &[
        ("max_connections", Kind::Integer),
        ("header_read_timeout", Kind::Duration),
        ("max_header_size", Kind::Size),
        (
            "proxy_protocol",
            Kind::Texts(&["127.0.0.1", "10.0.0.0/8", "::1"]),
        ),
        (
            "trusted_proxies",
            Kind::Texts(&["127.0.0.1", "10.0.0.0/8", "::1"]),
        ),
    ],
);
/// The limits of a tenant, of each of its client addresses, or a listener's per-IP ones.
const LIMITS: Fields = (
    &[],
    &[
        ("tunnels", Kind::Integer),
        ("handshakes", Kind::Rate),
        ("requests", Kind::Rate),
        ("bandwidth", Kind::Size),
    ],
);
const TENANT: Fields = (
    &[],
    &[("hosts", Kind::Texts(&["a.example", "*.example.com"]))],
);
const GLOBAL_LIMITS: Fields = (&[], &[("max_clients", Kind::Integer)]);
const CLUSTER: Fields = (
    &[(
        "redis",
        Kind::Text(&[
            "redis://127.0.0.1:6379",
            "redis://:pw@redis.internal/0",
            "rediss://r:6380",
        ]),
    )],
    &[
        ("on_failure", Kind::Text(&["open", "closed"])),
        ("lease", Kind::Duration),
        ("timeout", Kind::Duration),
    ],
);
const HTTP2: Fields = (
    &[],
    &[
        ("enabled", Kind::Bool),
        ("max_concurrent_streams", Kind::Integer),
        ("max_pending_resets", Kind::Integer),
        ("max_reset_rate", Kind::Integer),
        ("stream_window", Kind::Size),
        ("connection_window", Kind::Size),
        ("max_send_buffer", Kind::Size),
    ],
);
/// An upstream's fields but `balance` and `hash_key`, which depend on each other
/// (see [`balance`]).
const UPSTREAM: Fields = (
    &[("servers", Kind::Servers)],
    &[
        ("connect_timeout", Kind::Duration),
        ("max_fails", Kind::Integer),
        ("fail_timeout", Kind::Duration),
    ],
);
const HEALTH: Fields = (
    &[("check", Kind::Text(&["http", "http", "tcp"]))],
    &[
        ("path", Kind::Text(&["/", "/health"])),
        ("expect_status", Kind::Status),
        ("interval", Kind::Duration),
        ("timeout", Kind::Duration),
        ("rise", Kind::Integer),
        ("fall", Kind::Integer),
    ],
);
/// A route's fields but `upstream`, `status` and `body`, which say what it does (see
/// [`action`]).
const ROUTE: Fields = (
    &[],
    &[
        ("name", Kind::Text(&["ws", "admin"])),
        ("listeners", Kind::Refs(Table::Listener)),
        ("host", Kind::Text(&["example.com", "*.example.com"])),
        ("path_prefix", Kind::Text(&["/", "/ws"])),
        ("preserve_host", Kind::Bool),
        ("normalize_path", Kind::Bool),
        ("idle_timeout", Kind::Duration),
        ("handshake_timeout", Kind::Duration),
        ("request_timeout", Kind::Duration),
        ("plugins", Kind::Refs(Table::Plugin)),
        ("pools", Kind::Refs(Table::Upstream)),
        ("tenant", Kind::Text(&["acme"])),
    ],
);
/// A route's `[routes.capture]` table.
const CAPTURE: Fields = (
    &[("file", Kind::Text(&["capture.jsonl", "captures/ws.jsonl"]))],
    &[
        (
            "redact",
            Kind::Texts(&["authorization", "Cookie", "bad name"]),
        ),
        ("max_size", Kind::Size),
    ],
);
const PLUGIN: Fields = (
    &[("path", Kind::Text(&["p.wasm", "plugins/p.wasm"]))],
    &[
        ("fail_open", Kind::Bool),
        ("cpu_deadline", Kind::Duration),
        ("memory", Kind::Size),
        ("max_instances", Kind::Integer),
        ("max_reused", Kind::Integer),
        // A dotted key: the `grants` table's one field.
        (
            "grants.http",
            Kind::Texts(&[
                "https://idp.example/.well-known/jwks.json",
                "http://127.0.0.1:8080/keys",
                "ftp://idp.example/keys",
            ]),
        ),
    ],
);

/// How one document is made: the tables it defines, and how many values in a hundred
/// are [`unlikely`] ones.
#[derive(Debug, Clone)]
struct Plan {
    noise: u32,
    listeners: Arc<[&'static str]>,
    upstreams: Arc<[&'static str]>,
    plugins: Arc<[&'static str]>,
}

impl Plan {
    fn defined(&self, table: Table) -> Arc<[&'static str]> {
        match table {
            Table::Listener => self.listeners.clone(),
            Table::Upstream => self.upstreams.clone(),
            Table::Plugin => self.plugins.clone(),
        }
    }

    /// The same tables, with `noise` unlikely values in a hundred.
    fn with_noise(&self, noise: u32) -> Plan {
        Plan {
            noise,
            ..self.clone()
        }
    }
}

/// Free text without `:`, so that no generated server address needs a DNS lookup.
fn free_text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.replace(':', ""))
}

/// Durations, well-formed or not, in range or far past it.
fn duration_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,3}(ms|s|m|h|d)",
        "[0-9]{1,22}(ms|s|m|h|d)([0-9]{1,22}(ms|s|m|h|d)){0,2}",
        "[0-9a-z ]{0,8}",
        free_text(),
    ]
}

/// Sizes, well-formed or not, in range or far past it.
fn size_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,7}(KiB|MiB)",
        "[0-9]{1,22} ?(B|KiB|MiB|GiB|TiB|KB|kB|MB|GB|TB|PB|)",
        free_text(),
    ]
}

/// Integers: zero, negative, at the limits and around them.
fn integer() -> impl Strategy<Value = i64> {
    prop_oneof![
        select(vec![0, -1, 1, 200, 1024, 1025, 65_536, i64::MAX, i64::MIN]),
        0..70_000i64,
        any::<i64>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(WORDS).prop_map(String::from),
        1 => duration_text(),
        1 => size_text(),
    ]
}

/// A TOML string literal.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A TOML key: bare when it can be.
fn key(s: &str) -> String {
    let bare = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare { s.to_string() } else { quoted(s) }
}

fn array(items: Vec<String>) -> String {
    format!("[{}]", items.join(", "))
}

/// Any TOML value: strings, integers, bools, floats, dates, arrays and inline tables.
fn any_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        text().prop_map(|s| quoted(&s)),
        integer().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        select(vec!["1.5", "-0.0", "inf", "nan", "1979-05-27", "07:32:00"]).prop_map(String::from),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(array),
            vec((select(NAMES), inner), 0..3).prop_map(|entries| {
                let entries: Vec<String> = entries
                    .into_iter()
                    .map(|(k, v)| format!("{} = {v}", key(k)))
                    .collect();
                format!("{{ {} }}", entries.join(", "))
            }),
        ]
    })
}

/// A value a real config could hold for a field of this kind.
fn plausible(kind: Kind, plan: &Plan) -> BoxedStrategy<String> {
    match kind {
        Kind::Duration => "[1-9][0-9]{0,2}(ms|s|m)".prop_map(|s| quoted(&s)).boxed(),
        Kind::Size => prop_oneof![
            // Within both the header size's range and a plugin's memory range.
            "(64|512)KiB".prop_map(|s| quoted(&s)),
            (65_536..1_048_576i64).prop_map(|n| n.to_string()),
        ]
        .boxed(),
        Kind::Integer => (1..=256i64).prop_map(|n| n.to_string()).boxed(),
        Kind::Status => (200..=599i64).prop_map(|n| n.to_string()).boxed(),
        Kind::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        Kind::Text(pool) => select(pool).prop_map(quoted).boxed(),
        Kind::Texts(pool) => subsequence(pool, 0..=pool.len())
            .prop_map(|items| array(items.into_iter().map(quoted).collect()))
            .boxed(),
        Kind::Ref(table) => match plan.defined(table) {
            names if names.is_empty() => select(NAMES).prop_map(quoted).boxed(),
            names => select(names.to_vec()).prop_map(quoted).boxed(),
        },
        Kind::Refs(table) => {
            let names = plan.defined(table).to_vec();
            let most = names.len().min(2);
            subsequence(names, 0..=most)
                .prop_map(|names| array(names.into_iter().map(quoted).collect()))
                .boxed()
        }
        Kind::Servers => subsequence(&SERVERS[..4], 1..=2)
            .prop_map(|servers| array(servers.into_iter().map(quoted).collect()))
            .boxed(),
        Kind::Rate => (1..=1000i64, option::of(1..=2000i64))
            .prop_map(|(rate, burst)| match burst {
                Some(b) => format!("{{ rate = {rate}, burst = {b} }}"),
                None => format!("{{ rate = {rate} }}"),
            })
            .boxed(),
    }
}

/// A value of the field's type that is likely wrong (malformed, out of range, naming a
/// table that is not there), or any value at all.
fn unlikely(kind: Kind, plan: &Plan) -> BoxedStrategy<String> {
    let typed = match kind {
        Kind::Duration => duration_text().prop_map(|s| quoted(&s)).boxed(),
        Kind::Size => prop_oneof![
            size_text().prop_map(|s| quoted(&s)),
            integer().prop_map(|n| n.to_string()),
        ]
        .boxed(),
        Kind::Integer | Kind::Status => integer().prop_map(|n| n.to_string()).boxed(),
        Kind::Text(_) => text().prop_map(|s| quoted(&s)).boxed(),
        Kind::Texts(_) => vec(text().prop_map(|s| quoted(&s)), 0..3)
            .prop_map(array)
            .boxed(),
        Kind::Ref(_) => select(NAMES).prop_map(quoted).boxed(),
        Kind::Refs(_) => vec(select(NAMES).prop_map(quoted), 0..3)
            .prop_map(array)
            .boxed(),
        Kind::Servers => vec(select(SERVERS).prop_map(quoted), 0..3)
            .prop_map(array)
            .boxed(),
        Kind::Rate => (any_value(), option::of(any_value()))
            .prop_map(|(rate, burst)| match burst {
                Some(b) => format!("{{ rate = {rate}, burst = {b} }}"),
                None => format!("{{ rate = {rate} }}"),
            })
            .boxed(),
        Kind::Bool => plausible(kind, plan),
    };
    prop_oneof![5 => typed, 1 => any_value()].boxed()
}

/// A value for the field: plausible, or unlikely `plan.noise` times in a hundred.
fn value(kind: Kind, plan: &Plan) -> BoxedStrategy<String> {
    if plan.noise == 0 {
        return plausible(kind, plan);
    }
    prop_oneof![
        100 - plan.noise => plausible(kind, plan),
        plan.noise => unlikely(kind, plan),
    ]
    .boxed()
}

/// A table's required fields and some of its optional ones, each once, one
/// `key = value` per line.
fn entries((required, optional): Fields, plan: &Plan) -> BoxedStrategy<String> {
    let plan = plan.clone();
    subsequence(optional, 0..=optional.len())
        .prop_flat_map(move |chosen| {
            required
                .iter()
                .copied()
                .chain(chosen)
                .map(|(name, kind)| value(kind, &plan).prop_map(move |v| format!("{name} = {v}\n")))
                .collect::<Vec<_>>()
        })
        .prop_map(|lines| lines.concat())
        .boxed()
}

/// `header` and a body; `{}` in the header stands for `name`.
fn table(header: &str, name: &str, fields: Fields, plan: &Plan) -> BoxedStrategy<String> {
    let header = header.replace("{}", &key(name));
    entries(fields, plan)
        .prop_map(move |body| format!("{header}\n{body}\n"))
        .boxed()
}

/// The lines that choose an upstream's balancing: none, an algorithm, or `hash` with a
/// key.
fn balance() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        select(vec!["round-robin", "least-conn", "hash"])
            .prop_map(|b| format!("balance = \"{b}\"\n")),
        select(vec!["client-ip", "header:x-user", "cookie:sid", "query:k"])
            .prop_map(|k| format!("balance = \"hash\"\nhash_key = \"{k}\"\n")),
    ]
}

/// A listener table, maybe followed by its `http2` and `per_ip` tables.
fn listener(name: &str, plan: &Plan) -> BoxedStrategy<String> {
    (
        table("[listeners.{}]", name, LISTENER, plan),
        option::of(table("[listeners.{}.http2]", name, HTTP2, plan)),
        option::of(table("[listeners.{}.per_ip]", name, LIMITS, plan)),
    )
        .prop_map(|(listener, http2, per_ip)| {
            listener + &http2.unwrap_or_default() + &per_ip.unwrap_or_default()
        })
        .boxed()
}

/// A tenant table, maybe followed by its `limits` and `per_ip` tables.
fn tenant(name: &str, plan: &Plan) -> BoxedStrategy<String> {
    (
        table("[tenants.{}]", name, TENANT, plan),
        option::of(table("[tenants.{}.limits]", name, LIMITS, plan)),
        option::of(table("[tenants.{}.per_ip]", name, LIMITS, plan)),
    )
        .prop_map(|(t, limits, per_ip)| {
            t + &limits.unwrap_or_default() + &per_ip.unwrap_or_default()
        })
        .boxed()
}

/// An upstream table, maybe followed by its `health` table.
fn upstream(name: &str, plan: &Plan) -> BoxedStrategy<Vec<String>> {
    (
        table("[upstreams.{}]", name, UPSTREAM, plan),
        balance(),
        option::of(table("[upstreams.{}.health]", name, HEALTH, plan)),
    )
        .prop_map(|(upstream, balance, health)| {
            std::iter::once(upstream + &balance).chain(health).collect()
        })
        .boxed()
}

/// The lines that say what a route does: proxy to an upstream, or answer with a status
/// (and maybe a body); now and then both or neither, which validation refuses.
fn action(plan: &Plan) -> BoxedStrategy<String> {
    let upstream =
        value(Kind::Ref(Table::Upstream), plan).prop_map(|u| format!("upstream = {u}\n"));
    let status = (
        value(Kind::Status, plan),
        option::of(value(Kind::Text(&["", "forbidden\n"]), plan)),
    )
        .prop_map(|(status, body)| {
            let body = body.map(|b| format!("body = {b}\n")).unwrap_or_default();
            format!("status = {status}\n{body}")
        });
    prop_oneof![
        8 => upstream.clone(),
        4 => status.clone(),
        1 => (upstream, status).prop_map(|(u, s)| u + &s),
        1 => Just(String::new()),
    ]
    .boxed()
}

/// A route, now and then with a `[routes.capture]` table (which a fixed-answer route,
/// or a second route naming the same file, has refused).
fn route(plan: &Plan) -> BoxedStrategy<String> {
    (
        entries(ROUTE, plan),
        action(plan),
        option::weighted(0.3, table("[routes.capture]", "", CAPTURE, plan)),
    )
        .prop_map(|(body, action, capture)| {
            format!(
                "[[routes]]\n{body}{action}\n{}",
                capture.unwrap_or_default()
            )
        })
        .boxed()
}

/// A plugin table, maybe followed by its `config` table.
fn plugin(name: &str, plan: &Plan) -> BoxedStrategy<Vec<String>> {
    let config = format!("[plugins.{}.config]\n", key(name));
    (
        table("[plugins.{}]", name, PLUGIN, plan),
        option::of(any_value().prop_map(move |v| format!("{config}x = {v}\n"))),
    )
        .prop_map(|(plugin, config)| std::iter::once(plugin).chain(config).collect())
        .boxed()
}

/// Any one section with many unlikely values, bad names included, possibly repeating a
/// table (a TOML error).
fn any_section(plan: &Plan) -> BoxedStrategy<String> {
    let plan = plan.with_noise(25);
    select(NAMES)
        .prop_flat_map(move |name| {
            prop_oneof![
                table("[log]", name, LOG, &plan),
                listener(name, &plan),
                table("[listeners.{}.http2]", name, HTTP2, &plan),
                upstream(name, &plan).prop_map(|tables| tables.concat()),
                table("[upstreams.{}.health]", name, HEALTH, &plan),
                route(&plan),
                plugin(name, &plan).prop_map(|tables| tables.concat()),
                tenant(name, &plan),
                table("[cluster]", name, CLUSTER, &plan),
            ]
        })
        .boxed()
}

/// A document of the gateway's tables, each at most once and with its required fields,
/// in a shuffled order; in a noisy document, now and then one more section of any kind.
fn document() -> impl Strategy<Value = String> {
    (
        select(vec![0, 0, 2, 10]),
        subsequence(TABLE_NAMES, 1..=3),
        subsequence(TABLE_NAMES, 0..=3),
        subsequence(TABLE_NAMES, 0..=2),
    )
        .prop_flat_map(|(noise, listeners, upstreams, plugins)| {
            let plan = Plan {
                noise,
                listeners: listeners.into(),
                upstreams: upstreams.into(),
                plugins: plugins.into(),
            };
            let listeners: Vec<_> = (plan.listeners.iter())
                .map(|name| listener(name, &plan))
                .collect();
            let upstreams: Vec<_> = (plan.upstreams.iter())
                .map(|name| upstream(name, &plan))
                .collect();
            let plugins: Vec<_> = (plan.plugins.iter())
                .map(|name| plugin(name, &plan))
                .collect();
            let extra = if noise == 0 {
                Just(None).boxed()
            } else {
                option::weighted(f64::from(noise) / 100.0, any_section(&plan)).boxed()
            };
            (
                option::of(table("[log]", "", LOG, &plan)),
                option::of(table("[shutdown]", "", SHUTDOWN, &plan)),
                option::of(table("[runtime]", "", RUNTIME, &plan)),
                (
                    option::of(table("[admin]", "", ADMIN, &plan)),
                    option::of(table("[reload]", "", RELOAD, &plan)),
                    option::of(table("[limits]", "", GLOBAL_LIMITS, &plan)),
                    option::of(table("[cluster]", "", CLUSTER, &plan)),
                    option::of(tenant("acme", &plan)),
                ),
                listeners,
                upstreams,
                vec(route(&plan), 0..4),
                plugins,
                extra,
            )
                .prop_map(
                    |(
                        log,
                        shutdown,
                        runtime,
                        (admin, reload, limits, cluster, tenant),
                        listeners,
                        upstreams,
                        routes,
                        plugins,
                        extra,
                    )| {
                        let mut sections: Vec<String> = [
                            log, shutdown, runtime, admin, reload, limits, cluster, tenant, extra,
                        ]
                        .into_iter()
                        .flatten()
                        .collect();
                        sections.extend(listeners);
                        sections.extend(upstreams.into_iter().flatten());
                        sections.extend(routes);
                        sections.extend(plugins.into_iter().flatten());
                        sections
                    },
                )
                .prop_shuffle()
                .prop_map(|sections| sections.concat())
        })
}

/// Parses `src`: a config, or an `Invalid` error at a place inside the file.
fn parses_or_is_located(src: &str) -> Result<(), TestCaseError> {
    match Config::parse("sluice.toml", src) {
        Ok(_) => Ok(()),
        Err(ConfigError::Invalid {
            line,
            column,
            field,
            message,
            ..
        }) => {
            prop_assert!(line >= 1 && line <= src.split('\n').count(), "line {line}");
            prop_assert!(column >= 1, "column {column}");
            prop_assert!(!field.is_empty() && !message.is_empty());
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!("not a located error: {e}"))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_bounded_duration_or_an_error(s in prop_oneof![duration_text(), any::<String>()]) {
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(d <= MAX_DURATION, "{s:?} gave {d:?}");
        }
    }

    #[test]
    fn any_text_is_a_bounded_size_or_an_error(s in prop_oneof![size_text(), any::<String>()]) {
        if let Ok(n) = parse_size(&s) {
            prop_assert!(n <= MAX_SIZE, "{s:?} gave {n}");
        }
    }

    #[test]
    fn a_well_formed_duration_is_its_sum_or_too_long(
        parts in vec((0..u64::MAX, select(vec![("ms", 1u128), ("s", 1_000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)])), 1..4),
        small in any::<bool>(),
    ) {
        // With `small`, numbers short enough that many sums are in range, where each must
        // come back exactly.
        let parts: Vec<(u64, (&str, u128))> = parts
            .into_iter()
            .map(|(n, unit)| (if small { n % 10_000 } else { n }, unit))
            .collect();
        let text: String = parts.iter().map(|(n, (unit, _))| format!("{n}{unit}")).collect();
        let ms: u128 = parts.iter().map(|(n, (_, unit_ms))| u128::from(*n) * unit_ms).sum();
        match parse_duration(&text) {
            Ok(d) => prop_assert_eq!(d.as_millis(), ms),
            Err(e) => {
                prop_assert!(ms > MAX_DURATION.as_millis(), "{text:?}: {e}");
                prop_assert_eq!(e, UnitError::DurationTooLong(format!("{text:?}")));
            }
        }
    }

    #[test]
    fn generated_documents_give_a_config_or_a_located_error(src in document()) {
        parses_or_is_located(&src)?;
    }

    #[test]
    fn arbitrary_text_gives_a_config_or_a_located_error(
        src in prop_oneof![any::<String>(), "[a-z_.=\\[\\]{}\", 0-9#\n-]{0,200}"],
    ) {
        parses_or_is_located(&src)?;
    }
}
