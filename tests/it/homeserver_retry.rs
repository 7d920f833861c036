//! Retry behaviour of the homeserver client against a mock homeserver (wiremock).

use std::time::{Duration, Instant};

use mxpay::homeserver::{HomeserverClient, HomeserverClientConfig, HomeserverError, RetryPolicy};
use mxpay::registration::Secret;
use ruma::{owned_room_id, owned_user_id};
use serde_json::json;
use wiremock::matchers::{header, method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// Fast bounds so the failure paths finish in well under a second.
fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts_max: 4,
        backoff_base_ms: 10,
        backoff_max_ms: 200,
        total_max_ms: 10_000,
        // Generous: a loaded CI machine must not turn a normal answer into a timeout.
        attempt_timeout_ms: 5_000,
        connect_timeout_ms: 5_000,
    }
}

fn client(server: &MockServer, retry: RetryPolicy) -> HomeserverClient {
    HomeserverClient::new(HomeserverClientConfig {
        base_url: server.uri(),
        as_token: Secret::new("as-token-for-tests-0123456789"),
        appservice_id: "mxpay".to_owned(),
        bot_user_id: owned_user_id!("@_mxpay:localhost"),
        retry,
    })
    .unwrap()
}

/// Answers from a fixed script, one per call; the last one repeats.
struct Script(Vec<ResponseTemplate>, std::sync::atomic::AtomicUsize);

impl Script {
    fn new(responses: Vec<ResponseTemplate>) -> Self {
        Self(responses, std::sync::atomic::AtomicUsize::new(0))
    }
}

impl Respond for Script {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let i = self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0[i.min(self.0.len() - 1)].clone()
    }
}

fn join_path() -> wiremock::matchers::PathRegexMatcher {
    path_regex(r"^/_matrix/client/v3/rooms/[^/]+/join$")
}

fn joined() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"room_id": "!room:localhost"}))
}

fn matrix_error(status: u16, errcode: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({"errcode": errcode, "error": "test"}))
}

#[tokio::test]
async fn rate_limited_then_ok_waits_retry_after_ms() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(join_path())
        .and(header(
            "authorization",
            "Bearer as-token-for-tests-0123456789",
        ))
        .respond_with(Script::new(vec![
            ResponseTemplate::new(429).set_body_json(
                json!({"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": 150}),
            ),
            joined(),
        ]))
        .expect(2)
        .mount(&server)
        .await;
    let started = Instant::now();
    let room = client(&server, policy())
        .join_room(&owned_room_id!("!room:localhost"))
        .await
        .unwrap();
    assert_eq!(room, "!room:localhost");
    // Backoff alone would be 10 ms: the wait came from retry_after_ms.
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn rate_limited_honours_retry_after_header() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(join_path())
        .respond_with(Script::new(vec![
            ResponseTemplate::new(429).insert_header("Retry-After", "1"),
            joined(),
        ]))
        .expect(2)
        .mount(&server)
        .await;
    let retry = RetryPolicy {
        backoff_max_ms: 2_000,
        ..policy()
    };
    let started = Instant::now();
    client(&server, retry)
        .join_room(&owned_room_id!("!room:localhost"))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1_000));
}

#[tokio::test]
async fn server_errors_twice_then_ok() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(join_path())
        .respond_with(Script::new(vec![
            matrix_error(500, "M_UNKNOWN"),
            ResponseTemplate::new(502).set_body_string("bad gateway"),
            joined(),
        ]))
        .expect(3)
        .mount(&server)
        .await;
    client(&server, policy())
        .join_room(&owned_room_id!("!room:localhost"))
        .await
        .unwrap();
}

#[tokio::test]
async fn server_error_forever_gives_up_after_the_bound() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(join_path())
        .respond_with(matrix_error(500, "M_UNKNOWN"))
        .expect(4)
        .mount(&server)
        .await;
    let error = client(&server, policy())
        .join_room(&owned_room_id!("!room:localhost"))
        .await
        .unwrap_err();
    let HomeserverError::GaveUp { attempts, .. } = &error else {
        panic!("expected GaveUp, got {error:?}")
    };
    assert_eq!(*attempts, 4);
    assert!(error.is_transient());
    let message = error.to_string();
    assert!(message.contains("gave up after 4 attempts"), "{message}");
    assert!(message.contains("500"), "{message}");
    assert!(
        !message.contains("as-token-for-tests"),
        "token leaked: {message}"
    );
}

#[tokio::test]
async fn total_time_bound_stops_retries_early() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(join_path())
        .respond_with(matrix_error(503, "M_UNKNOWN"))
        .mount(&server)
        .await;
    let retry = RetryPolicy {
        attempts_max: 100,
        backoff_base_ms: 100,
        backoff_max_ms: 100,
        total_max_ms: 350,
        ..policy()
    };
    let error = client(&server, retry)
        .join_room(&owned_room_id!("!room:localhost"))
        .await
        .unwrap_err();
    let HomeserverError::GaveUp { attempts, .. } = error else {
        panic!("expected GaveUp, got {error:?}")
    };
    assert!((2..=4).contains(&attempts), "attempts {attempts}");
}

#[tokio::test]
async fn forbidden_is_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(join_path())
        .respond_with(matrix_error(403, "M_FORBIDDEN"))
        .expect(1)
        .mount(&server)
        .await;
    let error = client(&server, policy())
        .join_room(&owned_room_id!("!room:localhost"))
        .await
        .unwrap_err();
    assert_eq!(error.errcode(), Some("M_FORBIDDEN"));
    assert_eq!(error.status(), Some(403));
    assert!(!error.is_transient());
    server.verify().await;
}

#[tokio::test]
async fn timeout_is_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(join_path())
        .respond_with(Script::new(vec![
            joined().set_delay(Duration::from_secs(30)),
            joined(),
        ]))
        .expect(2)
        .mount(&server)
        .await;
    let retry = RetryPolicy {
        attempt_timeout_ms: 1_000,
        ..policy()
    };
    client(&server, retry)
        .join_room(&owned_room_id!("!room:localhost"))
        .await
        .unwrap();
}

#[tokio::test]
async fn connection_refused_names_the_problem() {
    // Bind then drop a listener: its port refuses connections.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = HomeserverClient::new(HomeserverClientConfig {
        base_url: format!("http://127.0.0.1:{port}"),
        as_token: Secret::new("as-token-for-tests-0123456789"),
        appservice_id: "mxpay".to_owned(),
        bot_user_id: owned_user_id!("@_mxpay:localhost"),
        retry: RetryPolicy {
            attempts_max: 2,
            ..policy()
        },
    })
    .unwrap();
    let error = client
        .join_room(&owned_room_id!("!room:localhost"))
        .await
        .unwrap_err();
    let HomeserverError::GaveUp {
        attempts: 2, last, ..
    } = &error
    else {
        panic!("expected GaveUp, got {error:?}")
    };
    assert!(
        matches!(**last, HomeserverError::Connect { .. }),
        "{last:?}"
    );
    assert!(error.to_string().contains("cannot connect"), "{error}");
}

#[tokio::test]
async fn register_bot_accepts_user_in_use_and_sends_appservice_login_type() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/register"))
        .and(wiremock::matchers::body_json(json!({
            "type": "m.login.application_service",
            "username": "_mxpay",
            "inhibit_login": true
        })))
        .respond_with(matrix_error(400, "M_USER_IN_USE"))
        .expect(1)
        .mount(&server)
        .await;
    client(&server, policy()).register_bot().await.unwrap();
}

#[tokio::test]
async fn ping_bad_status_is_reported_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v1/appservice/mxpay/ping"))
        .respond_with(matrix_error(502, "M_CONNECTION_FAILED"))
        .expect(1)
        .mount(&server)
        .await;
    let error = client(&server, policy()).ping(None).await.unwrap_err();
    assert_eq!(error.errcode(), Some("M_CONNECTION_FAILED"));
}

#[tokio::test]
async fn identity_assertion_sends_user_and_device_together() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(join_path())
        .and(query_param("user_id", "@_mxpay_alice:localhost"))
        .and(query_param("device_id", "DEVICE"))
        .respond_with(joined())
        .expect(1)
        .mount(&server)
        .await;
    let user = owned_user_id!("@_mxpay_alice:localhost");
    let device: ruma::OwnedDeviceId = "DEVICE".into();
    client(&server, policy())
        .send(
            ruma::api::client::membership::join_room_by_id::v3::Request::new(owned_room_id!(
                "!room:localhost"
            )),
            mxpay::homeserver::Identity::Device(&user, &device),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn bot_requests_use_the_stable_endpoints() {
    let server = MockServer::start().await;
    let ok = |body: serde_json::Value| ResponseTemplate::new(200).set_body_json(body);
    let mounts = [
        (
            "PUT",
            r"^/_matrix/client/v3/rooms/!r:localhost/send/m\.room\.message/t1$",
            ok(json!({"event_id": "$s"})),
        ),
        (
            "PUT",
            r"^/_matrix/client/v3/rooms/!r:localhost/redact/\$e/t2$",
            ok(json!({"event_id": "$red"})),
        ),
        (
            "PUT",
            r"^/_matrix/client/v3/profile/@_mxpay:localhost/displayname$",
            ok(json!({})),
        ),
        (
            "GET",
            r"^/_matrix/client/v3/rooms/!r:localhost/state$",
            ok(json!([])),
        ),
        (
            "GET",
            r"^/_matrix/client/v3/rooms/!r:localhost/members$",
            ok(json!({"chunk": []})),
        ),
        (
            "POST",
            r"^/_matrix/client/v1/appservice/mxpay/ping$",
            ok(json!({"duration_ms": 7})),
        ),
    ];
    for (verb, regex, response) in mounts {
        Mock::given(method(verb))
            .and(path_regex(regex))
            .and(header(
                "authorization",
                "Bearer as-token-for-tests-0123456789",
            ))
            .respond_with(response)
            .expect(1)
            .mount(&server)
            .await;
    }
    let client = client(&server, policy());
    let room = owned_room_id!("!r:localhost");
    let content = ruma::events::room::message::RoomMessageEventContent::notice_plain("hi");
    let sent = client
        .send_message(&room, "t1".into(), &content)
        .await
        .unwrap();
    assert_eq!(sent, "$s");
    let event: ruma::OwnedEventId = "$e".try_into().unwrap();
    client
        .redact(&room, &event, "t2".into(), Some("PIN posted in the room"))
        .await
        .unwrap();
    client.set_display_name("mxpay").await.unwrap();
    assert!(client.room_state(&room).await.unwrap().is_empty());
    assert!(client.room_members(&room).await.unwrap().is_empty());
    let txn: ruma::OwnedTransactionId = "ping-1".into();
    assert_eq!(
        client.ping(Some(&txn)).await.unwrap(),
        Duration::from_millis(7)
    );
    let ping = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.url.path().ends_with("/ping"))
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&ping.body).unwrap();
    assert_eq!(body, json!({"transaction_id": "ping-1"}));
}
