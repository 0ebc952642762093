//! Mints a test token, for trying `jwt-auth` by hand (see `examples/plugins/README.md`).
//!
//! ```sh
//! cargo run -q -p sluice-jwt --example mint -- HS256 SECRET '{"sub":"alice"}' [TTL_SECS]
//! cargo run -q -p sluice-jwt --example mint -- RS256 plugins/jwt/testdata/rsa_private.pem '{"sub":"alice"}'
//! cargo run -q -p sluice-jwt --example mint -- ES256 plugins/jwt/testdata/ec_private.pem '{"sub":"alice"}'
//! ```
//!
//! For HS256 the key is the secret itself; for RS256/ES256 it is a PKCS#8 PEM private-key
//! file. `iat` is set to now and `exp` to now + TTL (3600 s by default; a negative TTL
//! mints an expired token), unless the claims already carry them.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sluice_jwt::mint;

const USAGE: &str = "usage: mint HS256|RS256|ES256 SECRET|PEM_FILE CLAIMS_JSON [TTL_SECS]";

fn main() {
    match run(std::env::args().skip(1).collect()) {
        Ok(token) => println!("{token}"),
        Err(e) => {
            eprintln!("mint: {e}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

fn run(args: Vec<String>) -> Result<String, String> {
    let [alg, key, claims, rest @ ..] = args.as_slice() else {
        return Err("missing arguments".into());
    };
    let ttl: i64 = match rest {
        [] => 3600,
        [ttl] => ttl.parse().map_err(|_| format!("bad TTL_SECS {ttl:?}"))?,
        _ => return Err("too many arguments".into()),
    };
    let mut claims: Value =
        serde_json::from_str(claims).map_err(|e| format!("CLAIMS_JSON is not JSON: {e}"))?;
    let object = claims
        .as_object_mut()
        .ok_or("CLAIMS_JSON must be a JSON object")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    object.entry("iat").or_insert(now.into());
    object.entry("exp").or_insert((now + ttl).into());
    let pem = || std::fs::read_to_string(key).map_err(|e| format!("cannot read {key}: {e}"));
    match alg.to_ascii_uppercase().as_str() {
        "HS256" => Ok(mint::hs256(&claims, key.as_bytes())),
        "RS256" => mint::rs256(&claims, &pem()?),
        "ES256" => mint::es256(&claims, &pem()?),
        other => Err(format!("unknown algorithm {other:?}")),
    }
}
