//! End to end: webhooks both ways through the real binary over mTLS.
//!
//! Inbound, each provider's format as `Check` schemes — Standard Webhooks,
//! Stripe, GitHub, Slack — with the provider's secret imported into warden
//! (`keys create --secret-stdin`, sealed like any secret): genuine
//! deliveries pass, and every attack is refused: a replay, a tampered body,
//! another secret, a stale or future timestamp, headers missing. A secret
//! rotated mid-stream keeps both verifying through the grace period.
//! Outbound, `SignWebhook` / `warden webhooks sign` signs with a key's
//! secrets (both, during a rotation) and what it signs verifies.
//!
//! The deliveries here are signed by the test itself, from each provider's
//! documented format; `client/python/tests/test_webhooks.py` signs and
//! verifies with the providers' own libraries (standardwebhooks, stripe,
//! slack-sdk).

use crate::support;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine as _;
use support::{BIN, ConfigDir, Server};
use warden_client::Client;
use warden_client::proto::warden_client::WardenClient;
use warden_client::proto::{CheckRequest, Reason, SignWebhookRequest};
use warden_client::signing::{hmac_sha256, unix_now};

const STRIPE_SECRET: &str = "whsec_test_secret";
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

const CONFIG: &str = r#"
[[callers]]
identity = "spiffe://test/gateway"
roles = ["check", "admin", "sign"]

[[callers]]
identity = "spiffe://test/app-without-sign"
roles = ["check"]

[store]
dir = "store"
master_key_file = "master.key"

[[policies]]
name = "webhooks"
limit = 1000
period = "1h"

[[policies]]
name = "three"
limit = 3
period = "1h"
"#;

/// Runs the CLI against `server` with this directory's admin certificate,
/// `stdin` on its standard input.
fn cli(dir: &ConfigDir, server: &Server, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--target", &server.addr, "--ca", &p("ca.pem")])
        .args(["--cert", &p("client.pem"), "--key", &p("client-key.pem")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run warden");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Imports a provider's secret as key `id`.
fn import(dir: &ConfigDir, server: &Server, id: &str, secret: &str, policy: &str) {
    let out = cli(
        dir,
        server,
        &[
            "keys",
            "create",
            "--id",
            id,
            "--policy",
            policy,
            "--secret-stdin",
            "--json",
        ],
        format!("{secret}\n").as_bytes(),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        !shown.contains(secret),
        "an imported secret is echoed: {shown}"
    );
}

async fn start() -> (ConfigDir, Server, Client) {
    let dir = ConfigDir::new();
    dir.write_master_key();
    let server = dir.start(CONFIG);
    server.wait_past_fence();
    import(&dir, &server, "wh_stripe", STRIPE_SECRET, "webhooks");
    import(&dir, &server, "wh_github", GITHUB_SECRET, "webhooks");
    import(&dir, &server, "wh_slack", SLACK_SECRET, "webhooks");
    import(&dir, &server, "wh_std", SW_SECRET, "webhooks");
    let client = dir.client(&server).await;
    (dir, server, client)
}

pub(crate) fn delivery(
    key_id: &str,
    scheme: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> CheckRequest {
    CheckRequest {
        key_id: key_id.into(),
        scheme: scheme.into(),
        method: "POST".into(),
        path: format!("/webhooks/{scheme}"),
        body: body.to_vec().into(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        ..Default::default()
    }
}

fn stripe(secret: &str, t: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let sig = hex::encode(hmac_sha256(secret.as_bytes(), &signed));
    vec![("Stripe-Signature", format!("t={t},v1={sig}"))]
}

pub(crate) fn github(secret: &str, body: &[u8], delivery_id: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "X-Hub-Signature-256",
            format!(
                "sha256={}",
                hex::encode(hmac_sha256(secret.as_bytes(), body))
            ),
        ),
        ("X-GitHub-Delivery", delivery_id.to_owned()),
        ("X-GitHub-Event", "push".to_owned()),
    ]
}

fn slack(secret: &str, t: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let mut signed = format!("v0:{t}:").into_bytes();
    signed.extend_from_slice(body);
    vec![
        ("X-Slack-Request-Timestamp", t.to_string()),
        (
            "X-Slack-Signature",
            format!(
                "v0={}",
                hex::encode(hmac_sha256(secret.as_bytes(), &signed))
            ),
        ),
    ]
}

fn standard(secret: &str, id: &str, t: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut signed = format!("{id}.{t}.").into_bytes();
    signed.extend_from_slice(body);
    let sig = base64::engine::general_purpose::STANDARD.encode(hmac_sha256(&key, &signed));
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", t.to_string()),
        ("webhook-signature", format!("v1,{sig}")),
    ]
}

/// Signs a body with a secret, as one provider does.
type Signs = dyn Fn(&str, &[u8]) -> Vec<(&'static str, String)>;

async fn reason(client: &mut Client, req: CheckRequest) -> Reason {
    let r = client.check(req).await.unwrap();
    Reason::try_from(r.reason).unwrap()
}

#[tokio::test]
async fn each_provider_s_genuine_delivery_passes_once_and_every_forgery_is_refused() {
    let (_dir, _server, mut client) = start().await;
    let now = unix_now();
    let body = br#"{"id":"evt_1","type":"invoice.paid"}"#;
    let cases: Vec<(&str, &str, Box<Signs>)> = vec![
        (
            "wh_stripe",
            "stripe",
            Box::new(move |s, b| stripe(s, now, b)),
        ),
        (
            "wh_github",
            "github",
            Box::new(|s, b| github(s, b, "72d3162e-cc78-11e3-81ab-4c9367dc0958")),
        ),
        ("wh_slack", "slack", Box::new(move |s, b| slack(s, now, b))),
        (
            "wh_std",
            "standard-webhooks",
            Box::new(move |s, b| standard(s, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", now, b)),
        ),
    ];
    for (key, scheme, sign) in &cases {
        let secret = match *scheme {
            "stripe" => STRIPE_SECRET,
            "github" => GITHUB_SECRET,
            "slack" => SLACK_SECRET,
            _ => SW_SECRET,
        };
        let genuine = delivery(key, scheme, &sign(secret, body), body);
        let r = client.check(genuine.clone()).await.unwrap();
        assert_eq!(
            Reason::try_from(r.reason).unwrap(),
            Reason::Ok,
            "{scheme}: {r:?}"
        );
        assert_eq!(r.caller.unwrap().key_id, *key);
        // The same delivery again.
        assert_eq!(
            reason(&mut client, genuine).await,
            Reason::Replay,
            "{scheme}"
        );
        // The body changed under the signature.
        let mut tampered = delivery(
            key,
            scheme,
            &sign(secret, body),
            br#"{"id":"evt_1","type":"invoice.paid","amount":1}"#,
        );
        tampered.headers = delivery(key, scheme, &sign(secret, b"other"), body).headers;
        assert_eq!(
            reason(&mut client, tampered).await,
            Reason::Unauthenticated,
            "{scheme}"
        );
        // Signed with another secret.
        let other = if *scheme == "standard-webhooks" {
            "whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="
        } else {
            "an-attacker-guessed-secret-0123456789"
        };
        let forged = delivery(key, scheme, &sign(other, b"forged"), b"forged");
        assert_eq!(
            reason(&mut client, forged).await,
            Reason::Unauthenticated,
            "{scheme}"
        );
        // Another key's secret is not this key's.
        let crossed = delivery("wh_stripe", scheme, &sign(secret, b"crossed"), b"crossed");
        if *key != "wh_stripe" {
            assert_eq!(
                reason(&mut client, crossed).await,
                Reason::Unauthenticated,
                "{scheme}"
            );
        }
    }
    // GitHub's replay key is the signed body: a replay with a new delivery
    // id (not signed, so an attacker's choice) is still a replay.
    let again = delivery(
        "wh_github",
        "github",
        &github(GITHUB_SECRET, body, "ffffffff-new-id"),
        body,
    );
    assert_eq!(reason(&mut client, again).await, Reason::Replay);
    // Standard Webhooks: a retry of the message (same id, new time, new
    // signature) is the same message.
    let retry = delivery(
        "wh_std",
        "standard-webhooks",
        &standard(SW_SECRET, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", now + 1, body),
        body,
    );
    assert_eq!(reason(&mut client, retry).await, Reason::Replay);
}

/// A GitHub delivery carries no time, so no restart fence can refuse it
/// once its replay key is forgotten. A graceful restart keeps the key
/// (`state.saved`): a captured delivery sent after a deploy, under a new
/// delivery id, is still a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_delivery_sent_again_after_a_graceful_restart_is_still_a_replay() {
    let (dir, mut server, mut client) = start().await;
    let body = br#"{"ref":"refs/heads/main","after":"0b1e"}"#;
    let first = delivery(
        "wh_github",
        "github",
        &github(GITHUB_SECRET, body, "11111111-first"),
        body,
    );
    assert_eq!(reason(&mut client, first).await, Reason::Ok);
    assert!(server.terminate().success(), "{}", server.logs());

    let server = dir.start(CONFIG);
    server.wait_past_fence();
    let mut client = dir.client(&server).await;
    let again = delivery(
        "wh_github",
        "github",
        &github(GITHUB_SECRET, body, "22222222-captured"),
        body,
    );
    assert_eq!(reason(&mut client, again).await, Reason::Replay);
}

#[tokio::test]
async fn stale_future_and_unreadable_deliveries_are_refused_and_change_nothing() {
    let (_dir, _server, mut client) = start().await;
    let body = br#"{"id":"evt_2"}"#;
    let now = unix_now();
    for t in [now - 3600, now + 3600] {
        let r = delivery("wh_stripe", "stripe", &stripe(STRIPE_SECRET, t, body), body);
        assert_eq!(reason(&mut client, r).await, Reason::Stale);
        let r = delivery("wh_slack", "slack", &slack(SLACK_SECRET, t, body), body);
        assert_eq!(reason(&mut client, r).await, Reason::Stale);
        let r = delivery(
            "wh_std",
            "standard-webhooks",
            &standard(SW_SECRET, "msg_stale", t, body),
            body,
        );
        assert_eq!(reason(&mut client, r).await, Reason::Stale);
    }
    // Headers missing, or warden-v1 fields set: malformed, with why.
    let r = client
        .check(delivery("wh_stripe", "stripe", &[], body))
        .await
        .unwrap();
    assert_eq!(Reason::try_from(r.reason).unwrap(), Reason::Malformed);
    assert!(
        r.message.contains("Stripe-Signature") || r.message.contains("stripe-signature"),
        "{}",
        r.message
    );
    // A genuinely signed Stripe delivery, spoiled differently below.
    let genuine = || {
        delivery(
            "wh_stripe",
            "stripe",
            &stripe(STRIPE_SECRET, now, body),
            body,
        )
    };
    let mut mixed = genuine();
    mixed.nonce = "n".repeat(20);
    assert_eq!(reason(&mut client, mixed).await, Reason::Malformed);
    // A flood of headers, or one huge header, beside a genuine signature:
    // refused before anything is verified or remembered.
    let mut flooded = genuine();
    for i in 0..16 {
        flooded.headers.insert(format!("x-junk-{i}"), "j".into());
    }
    assert_eq!(reason(&mut client, flooded).await, Reason::Malformed);
    let mut huge = genuine();
    huge.headers.insert("x-junk".into(), "j".repeat(8 * 1024));
    assert_eq!(reason(&mut client, huge).await, Reason::Malformed);
    let mut headers_without_scheme = delivery(
        "wh_stripe",
        "warden-v1",
        &stripe(STRIPE_SECRET, now, body),
        body,
    );
    headers_without_scheme.timestamp = now;
    assert_eq!(
        reason(&mut client, headers_without_scheme).await,
        Reason::Malformed
    );
    // None of that remembered anything: the genuine delivery passes.
    assert_eq!(reason(&mut client, genuine()).await, Reason::Ok);
}

#[tokio::test]
async fn a_secret_rotated_mid_stream_keeps_both_verifying_through_the_grace_period() {
    let (dir, server, mut client) = start().await;
    let new_secret = "whsec_rotated_secret_for_stripe_0001";
    let out = cli(
        &dir,
        &server,
        &[
            "keys",
            "rotate",
            "wh_stripe",
            "--grace",
            "1h",
            "--secret-stdin",
            "--json",
        ],
        format!("{new_secret}\n").as_bytes(),
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(new_secret));
    let now = unix_now();
    for (i, secret) in [STRIPE_SECRET, new_secret].into_iter().enumerate() {
        let body = format!(r#"{{"id":"evt_rot_{i}"}}"#);
        let r = delivery(
            "wh_stripe",
            "stripe",
            &stripe(secret, now, body.as_bytes()),
            body.as_bytes(),
        );
        assert_eq!(reason(&mut client, r).await, Reason::Ok, "secret {i}");
    }
    // Stripe sends both signatures during its own rotation.
    let body = br#"{"id":"evt_rot_both"}"#;
    let old = &stripe(STRIPE_SECRET, now, body)[0].1;
    let new = &stripe(new_secret, now, body)[0].1;
    let both = format!("{old},{}", new.split_once(',').unwrap().1);
    let r = delivery("wh_stripe", "stripe", &[("Stripe-Signature", both)], body);
    assert_eq!(reason(&mut client, r).await, Reason::Ok);
}

#[tokio::test]
async fn the_key_s_rate_limits_apply_to_webhooks_as_to_any_request() {
    let (dir, server, mut client) = start().await;
    import(
        &dir,
        &server,
        "wh_limited",
        "a-provider-secret-0123456789",
        "three",
    );
    let now = unix_now();
    let mut reasons = Vec::new();
    for i in 0..4 {
        let body = format!(r#"{{"id":"evt_{i}"}}"#);
        let r = delivery(
            "wh_limited",
            "stripe",
            &stripe("a-provider-secret-0123456789", now, body.as_bytes()),
            body.as_bytes(),
        );
        reasons.push(reason(&mut client, r).await);
    }
    assert_eq!(
        reasons,
        [Reason::Ok, Reason::Ok, Reason::Ok, Reason::RateLimited]
    );
}

#[tokio::test]
async fn outbound_webhooks_are_signed_with_every_active_secret_and_verify() {
    let (dir, server, mut client) = start().await;
    // A key for signing: a generated Standard Webhooks secret, shown once
    // (to give the receiver), never needed by the app.
    let out = cli(
        &dir,
        &server,
        &[
            "keys",
            "create",
            "--id",
            "wh_out",
            "--policy",
            "webhooks",
            "--secret-format",
            "whsec",
            "--json",
        ],
        b"",
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let receiver_secret = v["secret"].as_str().unwrap().to_owned();
    assert!(receiver_secret.starts_with("whsec_"));
    let payload = br#"{"type":"invoice.paid","id":"inv_1"}"#;
    let out = cli(
        &dir,
        &server,
        &[
            "webhooks",
            "sign",
            "--key-id",
            "wh_out",
            "--scheme",
            "standard-webhooks",
            "--id",
            "msg_out_1",
            "--json",
        ],
        payload,
    );
    let headers: HashMap<String, String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(headers["webhook-id"], "msg_out_1");
    // What a receiver computes with the secret it was given.
    let t: i64 = headers["webhook-timestamp"].parse().unwrap();
    assert!((t - unix_now()).abs() <= 5);
    let expected = standard(&receiver_secret, "msg_out_1", t, payload);
    assert_eq!(headers["webhook-signature"], expected[2].1);

    // Rotation: both signatures during the grace period.
    let out = cli(
        &dir,
        &server,
        &[
            "keys",
            "rotate",
            "wh_out",
            "--grace",
            "1h",
            "--secret-format",
            "whsec",
            "--json",
        ],
        b"",
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_secret = v["secret"].as_str().unwrap().to_owned();
    let channel = warden_client::channel(
        &server.addr,
        warden_client::Tls::from_dev_dir(dir.path()).unwrap(),
    )
    .await
    .unwrap();
    let mut signer = WardenClient::new(channel);
    let signed = signer
        .sign_webhook(SignWebhookRequest {
            key_id: "wh_out".into(),
            scheme: "standard-webhooks".into(),
            payload: payload.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sigs: Vec<&str> = signed.headers["webhook-signature"].split(' ').collect();
    assert_eq!(sigs.len(), 2);
    for secret in [&receiver_secret, &new_secret] {
        let mine = standard(secret, &signed.message_id, signed.timestamp, payload);
        assert!(
            sigs.contains(&mine[2].1.as_str()),
            "no signature for one of the secrets"
        );
    }
    // Round trip: what warden signs, warden verifies as a receiver would.
    let headers: Vec<(&str, String)> = signed
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let back = delivery("wh_out", "standard-webhooks", &headers, payload);
    assert_eq!(reason(&mut client, back).await, Reason::Ok);

    // Stripe's format.
    let signed = signer
        .sign_webhook(SignWebhookRequest {
            key_id: "wh_stripe".into(),
            scheme: "stripe".into(),
            payload: payload.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expected = stripe(STRIPE_SECRET, signed.timestamp, payload);
    assert_eq!(signed.headers["Stripe-Signature"], expected[0].1);

    // Bad requests and callers.
    for bad in [
        SignWebhookRequest {
            key_id: "wh_out".into(),
            scheme: "github".into(),
            ..Default::default()
        },
        SignWebhookRequest {
            key_id: "wh_out".into(),
            scheme: "stripe".into(),
            message_id: "m".into(),
            ..Default::default()
        },
        SignWebhookRequest {
            key_id: "wh_out".into(),
            scheme: "stripe".into(),
            timestamp: unix_now() - 86_400,
            ..Default::default()
        },
    ] {
        let err = signer.sign_webhook(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    let err = signer
        .sign_webhook(SignWebhookRequest {
            key_id: "nope".into(),
            scheme: "stripe".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let tls = dir.client_tls("app", "app", &["spiffe://test/app-without-sign"]);
    let mut unsigned = WardenClient::new(warden_client::channel(&server.addr, tls).await.unwrap());
    let err = unsigned
        .sign_webhook(SignWebhookRequest {
            key_id: "wh_out".into(),
            scheme: "stripe".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // Nothing about the secrets in the server's log.
    let logs = server.logs();
    for secret in [
        &receiver_secret,
        &new_secret,
        &STRIPE_SECRET.to_owned(),
        &GITHUB_SECRET.to_owned(),
    ] {
        assert!(!logs.contains(secret.as_str()), "a secret was logged");
    }
}

#[tokio::test]
async fn a_delivery_whose_processing_failed_is_accepted_again_once_forgotten() {
    // The view failed after Check accepted a Standard Webhooks delivery;
    // the provider sends it again with the same message id. Without Forget
    // that retry is a REPLAY, and the event is never processed.
    let (dir, server, mut client) = start().await;
    let body = br#"{"type":"invoice.paid"}"#;
    let first = delivery(
        "wh_std",
        "standard-webhooks",
        &standard(SW_SECRET, "msg_forget_1", unix_now(), body),
        body,
    );
    assert_eq!(reason(&mut client, first.clone()).await, Reason::Ok);
    // The provider's retry, signed at its own time: the same message.
    let retry = delivery(
        "wh_std",
        "standard-webhooks",
        &standard(SW_SECRET, "msg_forget_1", unix_now() + 1, body),
        body,
    );
    assert_eq!(reason(&mut client, retry.clone()).await, Reason::Replay);

    // A forged delivery of the same id forgets nothing (and is answered as
    // Check answers it).
    let mut forged = first.clone();
    forged.body = br#"{"type":"refund"}"#.to_vec().into();
    let r = client.forget(forged).await.unwrap();
    assert_eq!(r.reason(), Reason::Unauthenticated, "{r:?}");
    assert_eq!(reason(&mut client, retry.clone()).await, Reason::Replay);

    // The app forgets the delivery it could not process: the retry is
    // accepted, once.
    let r = client.forget(first.clone()).await.unwrap();
    assert_eq!(r.reason(), Reason::Ok, "{r:?}");
    assert_eq!(r.caller.unwrap().key_id, "wh_std");
    assert_eq!(reason(&mut client, retry.clone()).await, Reason::Ok);
    assert_eq!(reason(&mut client, retry.clone()).await, Reason::Replay);
    // Forgetting twice, or what was never accepted, is no error.
    let never = delivery(
        "wh_std",
        "standard-webhooks",
        &standard(SW_SECRET, "msg_forget_2", unix_now(), body),
        body,
    );
    assert_eq!(
        client.forget(never.clone()).await.unwrap().reason(),
        Reason::Ok
    );
    assert_eq!(reason(&mut client, never).await, Reason::Ok);

    // A bearer key's request is not remembered: nothing to forget.
    let out = cli(
        &dir,
        &server,
        &[
            "keys", "create", "--owner", "mobile", "--bearer", "--policy", "webhooks", "--json",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bearer = CheckRequest {
        api_key: created["api_key"].as_str().unwrap().into(),
        method: "GET".into(),
        path: "/".into(),
        ..Default::default()
    };
    let r = client.forget(bearer).await.unwrap();
    assert_eq!(r.reason(), Reason::Malformed, "{r:?}");
    assert!(r.message.contains("nothing to forget"), "{r:?}");

    // Only a caller with the check role may forget.
    let tls = dir.client_tls("outsider", "outsider", &["spiffe://test/outsider"]);
    let mut outsider = WardenClient::new(warden_client::channel(&server.addr, tls).await.unwrap());
    let err = outsider.forget(first).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(reason(&mut client, retry).await, Reason::Replay);
    assert_eq!(
        support::metric(&server, "warden_requests_forgotten_total"),
        2,
        "the delivery and the one never accepted"
    );
    // The log says a delivery was forgotten, by key, never its contents.
    let logs = server.logs();
    assert!(logs.contains("request_forgotten"), "{logs}");
    assert!(!logs.contains("msg_forget_1") && !logs.contains(SW_SECRET));
}
