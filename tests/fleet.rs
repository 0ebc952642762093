//! A fleet of gateways without shared state: two `sluice` processes with the same pool
//! (its servers listed in a different order) send each sticky key to the same server,
//! because the consistent-hash ring depends only on the servers' addresses; a server
//! removed from both configs moves only its own keys, to the same new server on both.
//! Every echo [`Backend`] answers a plain request with `x-backend: NAME` and records its
//! head, so each key's server is seen from both sides.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use common::*;
use futures_util::future::join_all;

/// Sticky keys placed through each gateway.
const KEYS: usize = 1_000;

/// Keep-alive client connections per gateway that share the keys.
const CONNS: usize = 4;

/// A gateway config whose pool `echo` hashes the `x-user` header onto `servers` (in this
/// order), with an admin listener to reload through and no file watch.
fn hashed(servers: &[SocketAddr]) -> String {
    ConfigBuilder::new(servers)
        .upstream_toml("balance = \"hash\"\nhash_key = \"header:x-user\"")
        .log_level("warn")
        .extra(ADMIN)
        .extra("[reload]\nwatch = false\n")
        .build()
}

/// The addresses of `backends`, in the order of `names`.
fn listed(backends: &[Backend], names: &[&str]) -> Vec<SocketAddr> {
    names
        .iter()
        .map(|n| {
            backends
                .iter()
                .find(|b| b.name() == *n)
                .unwrap_or_else(|| panic!("no backend {n}"))
                .addr
        })
        .collect()
}

/// Sends `GET /` with `x-user: KEY` through the gateway at `addr` for every key, over
/// [`CONNS`] keep-alive connections, and returns the backend that answered each key (in
/// the order of `keys`).
async fn place(addr: SocketAddr, keys: &[String]) -> Vec<String> {
    let shares = (0..CONNS).map(|c| async move {
        let mut client = RawClient::connect(addr).await;
        let mut answered = Vec::new();
        for (i, key) in keys.iter().enumerate().skip(c).step_by(CONNS) {
            let answer = client.request(&Head::get("/").header("x-user", key)).await;
            assert_eq!(answer.status, 200, "key {key} through {addr}: {answer:?}");
            let name = answer
                .header("x-backend")
                .unwrap_or_else(|| panic!("key {key}: no x-backend in {answer:?}"));
            answered.push((i, name.to_string()));
        }
        answered
    });
    let mut placed = vec![String::new(); keys.len()];
    for (i, name) in join_all(shares).await.into_iter().flatten() {
        placed[i] = name;
    }
    placed
}

/// Places every key through both gateways at once; asserts that they agree on each key's
/// server and returns that placement.
async fn place_on_both(gateways: [&Gateway; 2], keys: &[String]) -> Vec<String> {
    let (one, two) = tokio::join!(
        place(gateways[0].addr(), keys),
        place(gateways[1].addr(), keys)
    );
    let disagree: Vec<String> = keys
        .iter()
        .zip(one.iter().zip(&two))
        .filter(|(_, (a, b))| a != b)
        .map(|(k, (a, b))| format!("{k}: {a} vs {b}"))
        .collect();
    assert!(
        disagree.is_empty(),
        "the gateways disagree on {} of {} keys, e.g. {:?}",
        disagree.len(),
        keys.len(),
        &disagree[..disagree.len().min(5)]
    );
    one
}

/// The backends' request counts (other than health probes), to mark where a round starts.
fn marks(backends: &[Backend]) -> Vec<usize> {
    backends.iter().map(|b| b.traffic().len()).collect()
}

/// Asserts that, since `marks`, each backend recorded exactly the keys `placed` on it, each
/// once per gateway (twice), and nothing else.
fn assert_recorded(backends: &[Backend], since: &[usize], keys: &[String], placed: &[String]) {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (backend, &from) in backends.iter().zip(since) {
        for request in &backend.traffic()[from..] {
            let key = request
                .header("x-user")
                .unwrap_or_else(|| panic!("{} got a request without x-user", backend.name()));
            seen.entry(key.to_string())
                .or_default()
                .push(backend.name().to_string());
        }
    }
    for (key, server) in keys.iter().zip(placed) {
        assert_eq!(
            seen.remove(key),
            Some(vec![server.clone(), server.clone()]),
            "the servers that recorded key {key}, placed on {server}"
        );
    }
    assert!(seen.is_empty(), "requests for unknown keys: {seen:?}");
}

/// How many keys each server holds.
fn tally(placed: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for name in placed {
        *counts.entry(name.as_str()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_agree_on_the_server_for_1000_sticky_keys() {
    let backends = Backend::start_many(4).await;
    let configs = |one: &[&str], two: &[&str]| {
        [
            hashed(&listed(&backends, one)),
            hashed(&listed(&backends, two)),
        ]
    };
    let [first, second] = configs(&["a", "b", "c", "d"], &["d", "b", "a", "c"]);
    let (one, two) = tokio::join!(Gateway::start(&first), Gateway::start(&second));
    let keys: Vec<String> = (0..KEYS).map(|i| format!("user-{i}")).collect();

    let start = marks(&backends);
    let before = place_on_both([&one, &two], &keys).await;
    assert_recorded(&backends, &start, &keys, &before);
    let load = tally(&before);
    assert!(
        load.len() == 4 && load.values().all(|&n| n >= 50),
        "keys not spread over the four servers: {load:?}"
    );

    // Both configs lose `c`; it keeps running, so only the ring can move its keys.
    let victim = "c";
    let [first, second] = configs(&["a", "b", "d"], &["d", "b", "a"]);
    for (gateway, config) in [(&one, first), (&two, second)] {
        std::fs::write(gateway.config_path(), config).expect("rewrite config");
        let answer = admin_post(gateway.admin().await, "/reload", None).await;
        assert_eq!(answer.status, 200, "reload: {}", answer.text());
    }

    let start = marks(&backends);
    let after = place_on_both([&one, &two], &keys).await;
    assert_recorded(&backends, &start, &keys, &after);
    let mut moved_to = BTreeSet::new();
    for ((key, was), now) in keys.iter().zip(&before).zip(&after) {
        if was == victim {
            assert_ne!(now, victim, "key {key} still on the removed server");
            moved_to.insert(now.as_str());
        } else {
            assert_eq!(now, was, "key {key} moved although its server stayed");
        }
    }
    assert!(
        moved_to.len() >= 2,
        "the removed server's {} keys all went to {moved_to:?}",
        load[victim]
    );
}
