//! `sluice replay CONFIG CAPTURE [--against OTHER]`: the requests of a capture file
//! (`capture`) run through the plugin chains of a config, offline: the plugins are
//! compiled and initialised as `sluice check` does, and nothing else is built (no
//! listener, no upstream connection, no health check). Each captured line goes to the
//! route of the same name, whose chain runs as the gateway runs it (`policy::judge`)
//! with decision reuse off, so every request reaches the plugins.
//!
//! Output, one JSON object per line on stdout: without `--against`, every replayed
//! request with its decision and `changed`, the aspects in which it differs from the
//! captured one (and then `captured`); with `--against`, only the requests whose
//! decisions under the two configs differ, with both and what differs. A line that
//! cannot be replayed (malformed, another format version, a route the config lacks) is
//! named on stderr as `CAPTURE:LINE: message` and the rest are replayed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::capture::{self, Decision, Kind, Line};
use crate::config::{Config, RouteConfig};
use crate::plugin::{Chain, PluginError, PluginHost};
use crate::policy;

/// Longest capture line read; a longer one is reported and skipped.
const MAX_LINE: u64 = 16 << 20;

/// Why a replay could not run (as opposed to a line it skipped).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A plugin of a config could not be loaded.
    #[error("{}: {source}", config.display())]
    Plugin {
        /// The config naming it.
        config: PathBuf,
        /// Why.
        source: PluginError,
    },
    /// The capture file could not be read.
    #[error("{}: {source}", file.display())]
    Read {
        /// The capture file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The output could not be written.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Lines run through the chains.
    pub replayed: usize,
    /// Lines named on stderr and not replayed.
    pub skipped: usize,
    /// Lines printed: every replayed line, or with `--against` those that differ.
    pub printed: usize,
}

/// A config's routes by name, each with its chain, loaded for replay.
pub struct Chains {
    path: PathBuf,
    routes: HashMap<String, (RouteConfig, Chain)>,
}

impl Chains {
    /// Loads `config`'s plugins on `host` (compile and `init`, as `sluice check` does)
    /// with decision reuse off, and builds each route's chain; the first route of a name
    /// wins.
    pub async fn load(
        path: &Path,
        config: &Config,
        host: &PluginHost,
    ) -> Result<Chains, ReplayError> {
        let mut plugins = HashMap::new();
        for spec in &config.plugins {
            let mut spec = spec.clone();
            spec.limits.max_reused = 0;
            let plugin = host
                .load(&spec)
                .await
                .map_err(|source| ReplayError::Plugin {
                    config: path.to_owned(),
                    source,
                })?;
            plugins.insert(spec.name.clone(), plugin);
        }
        let mut routes = HashMap::new();
        for r in &config.routes {
            routes
                .entry(r.name.clone())
                .or_insert_with(|| (r.clone(), Chain::named(&r.plugins, &plugins)));
        }
        Ok(Chains {
            path: path.to_owned(),
            routes,
        })
    }

    /// The decision the route named as `line` says takes for its request (redacted as the
    /// line was), or why it cannot be replayed here.
    async fn decide(&self, line: &Line) -> Result<Decision, String> {
        let Some((route, chain)) = self.routes.get(&line.route) else {
            return Err(format!(
                "route `{}` is not in {}",
                line.route,
                self.path.display()
            ));
        };
        if route.action_pool().is_none() {
            return Err(format!(
                "route `{}` of {} answers with a fixed status and runs no plugins",
                line.route,
                self.path.display()
            ));
        }
        let info = line.request.to_info(&route.name, route.tenant.as_deref());
        let judged = policy::judge(route, chain, &info).await;
        let mut decision = policy::captured(route, &judged);
        decision.redact(&line.redacted);
        Ok(decision)
    }
}

/// The request a printed line is about.
#[derive(Serialize)]
struct Seen<'a> {
    kind: Kind,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    query: &'a str,
    client: std::net::SocketAddr,
}

/// One line of output.
#[derive(Serialize)]
struct Printed<'a> {
    line: usize,
    route: &'a str,
    request: Seen<'a>,
    decision: &'a Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    against: Option<&'a Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    captured: Option<&'a Decision>,
    changed: Vec<&'static str>,
}

/// Replays the capture file `capture` through `config` (and `against`), printing to
/// `out` and naming the lines it skips on `diag`.
pub async fn replay(
    config: &Chains,
    against: Option<&Chains>,
    capture: &Path,
    out: &mut impl Write,
    diag: &mut impl Write,
) -> Result<Summary, ReplayError> {
    let read_err = |source| ReplayError::Read {
        file: capture.to_owned(),
        source,
    };
    let mut reader = BufReader::new(File::open(capture).map_err(read_err)?);
    let mut summary = Summary::default();
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut buf)
            .map_err(read_err)?;
        if n == 0 {
            break;
        }
        number += 1;
        let mut skip = |message: String| -> Result<(), ReplayError> {
            summary.skipped += 1;
            writeln!(diag, "{}:{number}: {message}", capture.display()).map_err(ReplayError::Output)
        };
        if buf.len() as u64 > MAX_LINE && buf.last() != Some(&b'\n') {
            // Skip to the end of the overlong line.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let n = (&mut reader)
                    .take(MAX_LINE)
                    .read_until(b'\n', &mut rest)
                    .map_err(read_err)?;
                if n == 0 || rest.last() == Some(&b'\n') {
                    break;
                }
            }
            skip(format!("line longer than {MAX_LINE} bytes"))?;
            continue;
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line: Line = match serde_json::from_slice(&buf) {
            Ok(l) => l,
            Err(e) => {
                skip(format!("not a capture line: {e}"))?;
                continue;
            }
        };
        if line.v != capture::VERSION {
            skip(format!(
                "capture format version {}; this sluice reads version {}",
                line.v,
                capture::VERSION
            ))?;
            continue;
        }
        let decision = match config.decide(&line).await {
            Ok(d) => d,
            Err(message) => {
                skip(message)?;
                continue;
            }
        };
        let other = match against {
            None => None,
            Some(a) => match a.decide(&line).await {
                Ok(d) => Some(d),
                Err(message) => {
                    skip(message)?;
                    continue;
                }
            },
        };
        summary.replayed += 1;
        let changed = capture::differences(other.as_ref().unwrap_or(&line.decision), &decision);
        if other.is_some() && changed.is_empty() {
            continue;
        }
        let r = &line.request;
        let printed = Printed {
            line: number,
            route: &line.route,
            request: Seen {
                kind: r.kind,
                method: &r.method,
                authority: &r.authority,
                path: &r.path,
                query: &r.query,
                client: r.client,
            },
            decision: &decision,
            against: other.as_ref(),
            captured: (other.is_none() && !changed.is_empty()).then_some(&line.decision),
            changed,
        };
        serde_json::to_writer(&mut *out, &printed).map_err(|e| ReplayError::Output(e.into()))?;
        writeln!(out).map_err(ReplayError::Output)?;
        summary.printed += 1;
    }
    out.flush().map_err(ReplayError::Output)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose routes run no plugins: `ws` (tenant `tenant`), `fixed` (a status).
    fn config(tenant: &str) -> Config {
        let src = format!(
            "[listeners.public]\nbind = \"127.0.0.1:0\"\n[upstreams.echo]\nservers = [\"127.0.0.1:9\"]\n\
             [[routes]]\nname = \"ws\"\nupstream = \"echo\"\ntenant = \"{tenant}\"\n\
             [[routes]]\nname = \"fixed\"\npath_prefix = \"/x\"\nstatus = 403\n"
        );
        Config::parse("sluice.toml", &src).unwrap()
    }

    /// A capture line for route `route` whose captured decision allowed it for `tenant`.
    fn line(route: &str, tenant: &str) -> String {
        format!(
            r#"{{"v":1,"ts_ms":0,"route":"{route}","request":{{"kind":"http","method":"GET","scheme":"http","authority":"a","path":"/","client":"127.0.0.1:1"}},"decision":{{"outcome":"allow","pool":"echo","tenant":"{tenant}"}}}}"#
        )
    }

    async fn run(against: Option<&str>, lines: &[String]) -> (Summary, String, String) {
        let host = PluginHost::new().unwrap();
        let main = Chains::load(Path::new("a.toml"), &config("acme"), &host)
            .await
            .unwrap();
        let other = match against {
            Some(t) => Some(
                Chains::load(Path::new("b.toml"), &config(t), &host)
                    .await
                    .unwrap(),
            ),
            None => None,
        };
        let file = std::env::temp_dir().join(format!(
            "sluice-replay-{}-{}.jsonl",
            std::process::id(),
            against.unwrap_or("-")
        ));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let (mut out, mut diag) = (Vec::new(), Vec::new());
        let summary = replay(&main, other.as_ref(), &file, &mut out, &mut diag)
            .await
            .unwrap();
        let _ = std::fs::remove_file(&file);
        let diag = String::from_utf8(diag)
            .unwrap()
            .replace(&*file.to_string_lossy(), "CAPTURE");
        (summary, String::from_utf8(out).unwrap(), diag)
    }

    #[tokio::test]
    async fn lines_for_routes_a_config_cannot_replay_are_named() {
        let lines = [
            line("ws", "acme"),
            line("gone", "acme"),
            line("fixed", "acme"),
        ];
        let (summary, out, diag) = run(None, &lines).await;
        assert_eq!(
            summary,
            Summary {
                replayed: 1,
                skipped: 2,
                printed: 1
            }
        );
        assert!(
            out.contains(r#""line":1"#) && out.contains(r#""changed":[]"#),
            "{out}"
        );
        assert_eq!(
            diag,
            "CAPTURE:2: route `gone` is not in a.toml\n\
             CAPTURE:3: route `fixed` of a.toml answers with a fixed status and runs no plugins\n"
        );
    }

    #[tokio::test]
    async fn against_prints_only_what_differs_and_how() {
        let lines = [line("ws", "acme"), line("ws", "other")];
        let (summary, out, _) = run(Some("acme"), &lines).await;
        assert_eq!((summary.replayed, summary.printed), (2, 0), "{out}");
        let (summary, out, _) = run(Some("globex"), &lines).await;
        assert_eq!((summary.replayed, summary.printed), (2, 2));
        let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(first["decision"]["tenant"], "acme");
        assert_eq!(first["against"]["tenant"], "globex");
        assert_eq!(first["changed"], serde_json::json!(["tenant"]));
    }
}
