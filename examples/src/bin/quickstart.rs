//! The quickstart: two echo backends and Sluice in front of them, configured by
//! `examples/quickstart.toml`. Open http://127.0.0.1:8080/ in a browser, or point any
//! WebSocket client at ws://127.0.0.1:8080/echo.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/quickstart.toml"));
    let config = sluice::config::Config::load(&path)?;
    let logs = sluice::control::init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for server in &config.upstreams[0].servers {
            sluice_examples::bind_echo(server.addr, &server.authority).await?;
        }
        println!(
            "Sluice quickstart: open http://127.0.0.1:8080/ or ws://127.0.0.1:8080/echo; \
             the status page is http://127.0.0.1:9901/ (Ctrl-C stops)"
        );
        sluice::control::run(path, config, logs).await
    })
}
