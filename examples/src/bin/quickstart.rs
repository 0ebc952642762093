//! The quickstart: two echo backends and Sluice in front of them, configured by
//! `examples/quickstart.toml`. Open http://127.0.0.1:8080/ in a browser, or point any
//! WebSocket client at ws://127.0.0.1:8080/echo.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/quickstart.toml"));
    sluice_examples::run_quickstart(
        path,
        "Sluice quickstart: open http://127.0.0.1:8080/ or ws://127.0.0.1:8080/echo; \
         the status page is http://127.0.0.1:9901/ (Ctrl-C stops)",
    )
}
