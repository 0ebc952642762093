//! The TLS quickstart: like `quickstart`, with Sluice terminating TLS on
//! https://localhost:8443/ (`examples/quickstart-tls.toml`). Before Sluice starts it makes
//! a throw-away CA and a `localhost` certificate in `target/quickstart-tls/` (kept while
//! valid) and prints how to make a browser trust them.

use std::path::{Path, PathBuf};

use sluice_examples::tls;

fn main() -> anyhow::Result<()> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = examples.join("quickstart-tls.toml");
    // The directory the config's certificate paths name (relative to the config file).
    let dir = examples.join(tls::QUICKSTART_DIR);
    let certs = tls::ensure_certs(&dir)?;
    sluice_examples::run_quickstart(path, &instructions(&certs))
}

/// What to open and how to trust the certificate.
fn instructions(certs: &tls::Certs) -> String {
    let shown = |p: &PathBuf| {
        p.canonicalize()
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string()
    };
    let ca = shown(&certs.ca);
    let made = if certs.fresh { "made" } else { "reused" };
    format!(
        "Sluice TLS quickstart: open https://localhost:8443/ (its page opens wss://localhost:8443/echo); Ctrl-C stops.\n\
         Certificates ({made}, valid until {until}): CA {ca}, server {cert}.\n\
         The browser must trust them, either way:\n\
         - one-off, Chromium/Chrome without touching any trust store:\n    \
           chromium --user-data-dir=$(mktemp -d) --ignore-certificate-errors-spki-list={spki} https://localhost:8443/\n\
         - or trust the throw-away CA (its key was discarded after signing, so it vouches for this certificate only):\n    \
           Chromium on Linux: certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n sluice-quickstart -i {ca}\n    \
           Firefox: Settings > Certificates > View Certificates > Authorities > Import {ca}\n    \
           curl: curl --cacert {ca} https://localhost:8443/",
        until = tls::utc_date(certs.valid_until),
        cert = shown(&certs.cert),
        spki = certs.spki_sha256,
    )
}
