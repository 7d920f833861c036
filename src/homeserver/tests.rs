//! The one client's retry rule and identities, against a mock homeserver on loopback.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::api::client::to_device::send_event_to_device;
use ruma::events::AnyToDeviceEventContent;
use ruma::serde::Raw;
use ruma::to_device::DeviceIdOrAllDevices;
use ruma::{OwnedDeviceId, OwnedUserId};
use serde_json::json;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::*;
use crate::metrics::Metrics;

const AS_TOKEN: &str = "as-token-for-unit-tests";

/// The crypto device's bounds with waits short enough for a unit test.
fn fast_device_policy() -> RetryPolicy {
    RetryPolicy {
        backoff_base_ms: 5,
        backoff_max_ms: 100,
        // Generous: a loaded machine must not turn a normal answer into a timeout.
        attempt_timeout_ms: 5_000,
        ..RetryPolicy::CRYPTO_DEVICE
    }
}

fn client(server: &MockServer, retry: RetryPolicy) -> HomeserverClient {
    HomeserverClient::new(HomeserverClientConfig {
        base_url: server.uri(),
        as_token: Secret::new(AS_TOKEN),
        appservice_id: "mxpay".to_owned(),
        bot_user_id: "@_mxpay:localhost".try_into().unwrap(),
        retry,
    })
    .unwrap()
}

/// Answers from a fixed script, one per call; the last one repeats.
struct Script(Vec<ResponseTemplate>, AtomicUsize);

impl Script {
    fn new(responses: Vec<ResponseTemplate>) -> Self {
        Self(responses, AtomicUsize::new(0))
    }
}

impl Respond for Script {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let i = self.1.fetch_add(1, Ordering::SeqCst);
        self.0[i.min(self.0.len() - 1)].clone()
    }
}

fn matrix_error(status: u16, errcode: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({"errcode": errcode, "error": "test"}))
}

/// A to-device request as the crypto device sends it (key shares go out this way).
fn to_device(txn_id: &str) -> send_event_to_device::v3::Request {
    let user: OwnedUserId = "@alice:localhost".try_into().unwrap();
    let device: OwnedDeviceId = "ALICEDEV".into();
    let content: Raw<AnyToDeviceEventContent> =
        Raw::new(&json!({"nonce": "n"})).unwrap().cast_unchecked();
    let mut messages = BTreeMap::new();
    messages.insert(
        user,
        BTreeMap::from([(DeviceIdOrAllDevices::DeviceId(device), content)]),
    );
    send_event_to_device::v3::Request::new_raw("org.mxpay.test".into(), txn_id.into(), messages)
}

fn to_device_path() -> wiremock::matchers::PathRegexMatcher {
    path_regex(r"^/_matrix/client/v3/sendToDevice/org\.mxpay\.test/[^/]+$")
}

fn query(request: &Request, key: &str) -> Option<String> {
    request
        .url
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn bearer(request: &Request) -> Option<String> {
    request
        .headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned())
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing: {text}"))
}

#[tokio::test]
async fn masqueraded_device_request_retries_5xx_with_the_same_txn_id_and_counts_each_attempt() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(to_device_path())
        .respond_with(Script::new(vec![
            matrix_error(500, "M_UNKNOWN"),
            ResponseTemplate::new(502).set_body_string("bad gateway"),
            ResponseTemplate::new(200).set_body_json(json!({})),
        ]))
        .expect(3)
        .mount(&server)
        .await;
    let metrics = Arc::new(Metrics::new());
    let client = client(&server, fast_device_policy()).with_metrics(metrics.clone());
    let identity = DeviceIdentity::Masquerade {
        device_id: "MXPAYDEVICE".into(),
    };
    client
        .send(to_device("txn-1"), Identity::BotDevice(&identity))
        .await
        .unwrap();

    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 3);
    for request in &received {
        // Every attempt is the same request: the homeserver deduplicates by this txn id.
        assert_eq!(
            request.url.path(),
            "/_matrix/client/v3/sendToDevice/org.mxpay.test/txn-1"
        );
        assert_eq!(
            query(request, "user_id").as_deref(),
            Some("@_mxpay:localhost")
        );
        assert_eq!(query(request, "device_id").as_deref(), Some("MXPAYDEVICE"));
        assert_eq!(bearer(request), Some(format!("Bearer {AS_TOKEN}")));
    }
    let text = metrics.encode();
    let endpoint = "to_device::send_event_to_device::v3";
    assert_eq!(
        sample(
            &text,
            &format!(r#"mxpay_homeserver_request_duration_seconds_count{{endpoint="{endpoint}"}}"#)
        ),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                r#"mxpay_homeserver_request_errors_total{{endpoint="{endpoint}",kind="status_5xx"}}"#
            )
        ),
        2.0
    );
}

#[tokio::test]
async fn device_with_its_own_token_sends_that_token_and_no_assertion() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(to_device_path())
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .expect(1)
        .mount(&server)
        .await;
    let identity = DeviceIdentity::AccessToken {
        device_id: "MXPAYDEVICE".into(),
        token: Secret::new("syt_device_token"),
    };
    client(&server, fast_device_policy())
        .send(to_device("txn-2"), Identity::BotDevice(&identity))
        .await
        .unwrap();
    let received = server.received_requests().await.unwrap();
    assert_eq!(
        bearer(&received[0]).as_deref(),
        Some("Bearer syt_device_token")
    );
    assert_eq!(query(&received[0], "user_id"), None);
    assert_eq!(query(&received[0], "device_id"), None);
    assert!(!format!("{identity:?}").contains("syt_device_token"));
}

#[tokio::test]
async fn rate_limit_waits_what_the_server_asks_capped_by_the_policy() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(to_device_path())
        .respond_with(Script::new(vec![
            ResponseTemplate::new(429).set_body_json(
                json!({"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": 300}),
            ),
            // Asks for a minute; the policy's cap (400 ms) wins.
            ResponseTemplate::new(429)
                .set_body_json(json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 60_000})),
            ResponseTemplate::new(200).set_body_json(json!({})),
        ]))
        .expect(3)
        .mount(&server)
        .await;
    let policy = RetryPolicy {
        backoff_max_ms: 400,
        ..fast_device_policy()
    };
    let started = Instant::now();
    client(&server, policy)
        .send(to_device("txn-3"), Identity::Appservice)
        .await
        .unwrap();
    let elapsed = started.elapsed();
    // Backoff alone would be 5 + 10 ms: the first wait came from retry_after_ms.
    assert!(elapsed >= Duration::from_millis(300 + 400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
}

#[tokio::test]
async fn refusal_is_sent_once_and_exhaustion_is_transient() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path(
            "/_matrix/client/v3/sendToDevice/org.mxpay.test/refused",
        ))
        .respond_with(matrix_error(403, "M_FORBIDDEN"))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/_matrix/client/v3/sendToDevice/org.mxpay.test/down"))
        .respond_with(matrix_error(503, "M_UNKNOWN"))
        .expect(u64::from(RetryPolicy::CRYPTO_DEVICE.attempts_max))
        .mount(&server)
        .await;
    let client = client(&server, fast_device_policy());

    let refused = client
        .send(to_device("refused"), Identity::Appservice)
        .await
        .unwrap_err();
    assert!(refused.is_refusal(), "{refused:?}");
    assert!(!refused.is_transient());
    assert_eq!(refused.errcode(), Some("M_FORBIDDEN"));

    let down = client
        .send(to_device("down"), Identity::Appservice)
        .await
        .unwrap_err();
    assert!(
        matches!(down, HomeserverError::GaveUp { attempts: 6, .. }),
        "{down:?}"
    );
    assert!(down.is_transient());
    assert!(!down.is_refusal());
    server.verify().await;
}

#[tokio::test]
async fn with_retry_applies_its_attempt_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(to_device_path())
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({}))
                .set_delay(Duration::from_secs(10)),
        )
        .mount(&server)
        .await;
    // Built with a long attempt timeout; the derived client must not wait for it.
    let base = client(
        &server,
        RetryPolicy {
            attempt_timeout_ms: 60_000,
            ..fast_device_policy()
        },
    );
    let short = base.with_retry(RetryPolicy {
        attempts_max: 2,
        attempt_timeout_ms: 200,
        ..fast_device_policy()
    });
    let started = Instant::now();
    let error = short
        .send(to_device("txn-4"), Identity::Appservice)
        .await
        .unwrap_err();
    let HomeserverError::GaveUp {
        attempts: 2, last, ..
    } = &error
    else {
        panic!("expected GaveUp after 2 attempts, got {error:?}")
    };
    assert!(
        matches!(
            **last,
            HomeserverError::Timeout {
                timeout_ms: 200,
                ..
            }
        ),
        "{last:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn server_versions_is_one_request_without_a_token() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/_matrix/client/versions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "versions": ["v1.11", "v1.12"],
            "unstable_features": {"org.matrix.msc3202": true}
        })))
        .expect(1)
        .mount(&server)
        .await;
    let versions = client(&server, fast_device_policy())
        .server_versions()
        .await
        .unwrap();
    assert_eq!(versions.versions, ["v1.11", "v1.12"]);
    assert_eq!(
        versions.unstable_features.get("org.matrix.msc3202"),
        Some(&true)
    );
    let received = server.received_requests().await.unwrap();
    assert_eq!(
        bearer(&received[0]),
        None,
        "the AS token went to an unchecked server"
    );

    // A server error is not retried here: it answers the question "is this Matrix?".
    let broken = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/_matrix/client/versions"))
        .respond_with(matrix_error(502, "M_UNKNOWN"))
        .expect(1)
        .mount(&broken)
        .await;
    let error = client(&broken, fast_device_policy())
        .server_versions()
        .await
        .unwrap_err();
    assert!(
        matches!(error, HomeserverError::NotMatrix { status: 502, .. }),
        "{error:?}"
    );
    broken.verify().await;
}
