//! `echo-backend ADDR [ADDR...]`: WebSocket echo servers for trying Sluice by hand.

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addrs: Vec<String> = std::env::args().skip(1).collect();
    if addrs.is_empty() {
        eprintln!("usage: echo-backend ADDR [ADDR...]   e.g. echo-backend 127.0.0.1:9001");
        std::process::exit(2);
    }
    for a in &addrs {
        let addr = a.parse().map_err(std::io::Error::other)?;
        let local = sluice_examples::bind_echo(addr, a).await?;
        println!("echo backend on {local}");
    }
    std::future::pending::<()>().await;
    Ok(())
}
