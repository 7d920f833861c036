//! In-process tests of the appservice API edge (tower `oneshot`, no socket).

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use crate::app::App;
use crate::config::Config;
use crate::registration::Registration;

const MAX_BODY: u64 = 4096;

pub(crate) fn test_app(dir: &std::path::Path, legacy: bool) -> (App, Registration) {
    let mut config = Config::from_yaml(&format!(
        "appservice: {{legacy_query_auth: {legacy}, max_body_bytes: {MAX_BODY}}}"
    ))
    .unwrap();
    config.data_dir = dir.to_owned();
    let registration = Registration::generate(&config);
    (
        App::open(config, registration.clone()).unwrap(),
        registration,
    )
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
    fn errcode(&self) -> String {
        self.json()["errcode"].as_str().unwrap_or("").to_owned()
    }
}

async fn call(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        text: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

fn put_txn(id: &str, token: Option<&str>, body: Value) -> Request<Body> {
    let mut builder = Request::put(format!("/_matrix/app/v1/transactions/{id}"))
        .header("content-type", "application/json");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

fn events(n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| {
            json!({"type": "m.room.message", "event_id": format!("${i}"), "room_id": "!r:localhost",
                        "sender": "@a:localhost", "content": {"msgtype": "m.text", "body": "hi"}})
        })
        .collect();
    json!({ "events": events, "de.sorunome.msc2409.to_device": [{"type": "m.room.encrypted"}] })
}

#[tokio::test]
async fn missing_token_is_401_wrong_token_is_403_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = test_app(dir.path(), false);
    let router = app.router();
    let requests = || {
        vec![
            (
                "PUT",
                "/_matrix/app/v1/transactions/1",
                events(1).to_string(),
            ),
            ("POST", "/_matrix/app/v1/ping", "{}".to_owned()),
            (
                "GET",
                "/_matrix/app/v1/users/@_mxpay_x:localhost",
                String::new(),
            ),
            ("GET", "/_matrix/app/v1/rooms/%23a:localhost", String::new()),
        ]
    };
    for (method, uri, body) in requests() {
        let a = call(
            &router,
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert_eq!(a.errcode(), "M_UNAUTHORIZED");
        for bad in ["Bearer wrong", "Bearer ", "Basic abc"] {
            let a = call(
                &router,
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("authorization", bad)
                    .body(Body::from(body.clone()))
                    .unwrap(),
            )
            .await;
            assert!(
                matches!(a.status, StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED),
                "{method} {uri} {bad}: {}",
                a.status
            );
        }
        let a = call(
            &router,
            Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", "Bearer wrong")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {uri}");
        assert_eq!(a.errcode(), "M_FORBIDDEN");
        assert!(a.json()["error"].is_string());
    }
    assert_eq!(app.inbox().depth(), 0, "nothing stored without the token");
}

#[tokio::test]
async fn legacy_query_token_only_when_enabled() {
    for legacy in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (app, registration) = test_app(dir.path(), legacy);
        let uri = format!(
            "/_matrix/app/v1/transactions/7?access_token={}",
            registration.hs_token.expose()
        );
        let a = call(
            &app.router(),
            Request::put(uri)
                .body(Body::from(events(1).to_string()))
                .unwrap(),
        )
        .await;
        let expected = if legacy {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(a.status, expected, "legacy={legacy}");
        let wrong = call(
            &app.router(),
            Request::put("/_matrix/app/v1/transactions/8?access_token=nope")
                .body(Body::from(events(1).to_string()))
                .unwrap(),
        )
        .await;
        let expected = if legacy {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(wrong.status, expected, "legacy={legacy}");
    }
}

#[tokio::test]
async fn transaction_is_stored_before_200_and_replay_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let (app, registration) = test_app(dir.path(), false);
    let token = registration.hs_token.expose();
    let router = app.router();
    let a = call(&router, put_txn("1", Some(token), events(2))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.text, "{}");
    assert_eq!(a.headers["content-length"], "2");
    assert_eq!(a.headers["content-type"], "application/json");
    // Stored by the time the answer exists, with the whole body (unstable keys included).
    let pending = app.inbox().pending(None, 10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].txn_id, "1");
    assert_eq!(pending[0].body, events(2));

    // The homeserver retrying the same transaction: answered, not stored again.
    let again = call(&router, put_txn("1", Some(token), events(2))).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.text, "{}");
    assert_eq!(app.inbox().depth(), 1, "replayed id is not stored again");
    assert_eq!(app.inbox().pending(None, 10).unwrap()[0].body, events(2));
    let metrics = call(
        &router,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(metrics
        .text
        .contains(r#"mxpay_transactions_received_total{outcome="duplicate"} 1"#));
    assert!(metrics.text.contains("mxpay_inbox_depth 1"));
}

#[tokio::test]
async fn replay_after_reopening_the_data_dir_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let (app, registration) = test_app(dir.path(), false);
    let token = registration.hs_token.expose().to_owned();
    call(&app.router(), put_txn("42", Some(&token), events(1))).await;
    let seq = app.inbox().pending(None, 1).unwrap()[0].seq;
    app.inbox().mark_processed(seq).await.unwrap();
    let config = app.config().clone();
    drop(app);
    let app = App::open(config, registration).unwrap();
    let a = call(&app.router(), put_txn("42", Some(&token), events(1))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        app.inbox().depth(),
        0,
        "processed before the restart: not queued again"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_without_reading_them_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (app, registration) = test_app(dir.path(), false);
    let token = registration.hs_token.expose();
    let router = app.router();
    // Declared too large: refused on the header alone (the body here is tiny).
    let a = call(
        &router,
        Request::put("/_matrix/app/v1/transactions/1")
            .header("authorization", format!("Bearer {token}"))
            .header("content-length", (MAX_BODY + 1).to_string())
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.errcode(), "M_TOO_LARGE");
    // Streamed without a length: refused once the running total passes the limit; the
    // stream would go on for 1 GiB, so finishing at all proves it was not read whole.
    let chunk = bytes::Bytes::from(vec![b' '; 1024]);
    let stream = futures_util::stream::iter(
        std::iter::repeat_n(chunk, 1024 * 1024).map(Ok::<_, std::io::Error>),
    );
    let a = call(
        &router,
        Request::put("/_matrix/app/v1/transactions/2")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from_stream(stream))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.inbox().depth(), 0);
    // Just under the limit is fine.
    let mut body = events(1);
    let room = MAX_BODY as usize - body.to_string().len() - 20;
    body["pad"] = Value::String("x".repeat(room));
    let a = call(&router, put_txn("3", Some(token), body)).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let dir = tempfile::tempdir().unwrap();
    let (app, registration) = test_app(dir.path(), false);
    let token = registration.hs_token.expose();
    let router = app.router();
    let raw = |body: &'static str| {
        Request::put("/_matrix/app/v1/transactions/9")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body))
            .unwrap()
    };
    assert_eq!(call(&router, raw("not json")).await.errcode(), "M_NOT_JSON");
    assert_eq!(call(&router, raw("[1]")).await.errcode(), "M_BAD_JSON");
    assert_eq!(
        call(&router, raw(r#"{"events": 1}"#)).await.errcode(),
        "M_BAD_JSON"
    );
    assert_eq!(app.inbox().depth(), 0);
    assert!(
        !app.inbox().contains("9").unwrap(),
        "a refused id stays unused"
    );
}

#[tokio::test]
async fn unknown_paths_404_and_wrong_methods_405() {
    let dir = tempfile::tempdir().unwrap();
    let (app, registration) = test_app(dir.path(), false);
    let token = registration.hs_token.expose();
    let router = app.router();
    for uri in [
        "/nope",
        "/_matrix/app/v1/thirdparty/protocol/x",
        "/_matrix/app/v2/ping",
    ] {
        let a = call(&router, Request::get(uri).body(Body::empty()).unwrap()).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(a.errcode(), "M_UNRECOGNIZED");
    }
    let a = call(
        &router,
        Request::get("/_matrix/app/v1/transactions/1")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.errcode(), "M_UNRECOGNIZED");
    let a = call(
        &router,
        Request::post("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn ping_users_and_rooms_answer_per_spec() {
    let dir = tempfile::tempdir().unwrap();
    let (app, registration) = test_app(dir.path(), false);
    let auth = format!("Bearer {}", registration.hs_token.expose());
    let router = app.router();
    let a = call(
        &router,
        Request::post("/_matrix/app/v1/ping")
            .header("authorization", &auth)
            .body(Body::from(r#"{"transaction_id":"t1"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.text.as_str()), (StatusCode::OK, "{}"));
    for uri in [
        "/_matrix/app/v1/users/@_mxpay_bob:localhost",
        "/_matrix/app/v1/rooms/%23room:localhost",
    ] {
        let a = call(
            &router,
            Request::get(uri)
                .header("authorization", &auth)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(a.errcode(), "M_NOT_FOUND");
    }
}

#[tokio::test]
async fn health_ready_and_metrics_need_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = test_app(dir.path(), false);
    let router = app.router();
    let get = |uri: &'static str| Request::get(uri).body(Body::empty()).unwrap();
    assert_eq!(call(&router, get("/health")).await.status, StatusCode::OK);
    assert_eq!(
        call(&router, get("/ready")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        call(&router, get("/_matrix/mau/ready")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    app.set_ready(true);
    assert_eq!(call(&router, get("/ready")).await.status, StatusCode::OK);
    assert_eq!(
        call(&router, get("/_matrix/mau/live")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&router, get("/_matrix/mau/ready")).await.status,
        StatusCode::OK
    );
    let metrics = call(&router, get("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(
        metrics.text.contains("mxpay_inbox_depth"),
        "{}",
        metrics.text
    );
    assert!(metrics
        .text
        .contains("# TYPE mxpay_handler_duration_seconds histogram"));
}

#[tokio::test]
async fn error_answers_leak_no_internals() {
    let dir = tempfile::tempdir().unwrap();
    let (app, registration) = test_app(dir.path(), false);
    let router = app.router();
    let a = call(&router, put_txn("1", Some("wrong"), events(1))).await;
    assert!(!a.text.contains(registration.hs_token.expose()));
    assert!(!a.text.contains(dir.path().to_str().unwrap()));
    assert_eq!(a.json().as_object().unwrap().len(), 2, "{}", a.text);
}

/// An app over `dir` with `metrics_yaml` as its `metrics:` section (a token file, if named,
/// is written 0600 in `dir` as `metrics.token` holding `scrape-token-1`).
fn metrics_app(dir: &std::path::Path, metrics_yaml: &str) -> App {
    let token = dir.join("metrics.token");
    std::fs::write(&token, "scrape-token-1\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut config = Config::from_yaml(&format!("metrics: {metrics_yaml}")).unwrap();
    config.resolve_paths(dir);
    config.data_dir = dir.join("data");
    let registration = Registration::generate(&config);
    App::open(config, registration).unwrap()
}

/// `/metrics` tells PIN failure counts: with `metrics.bearer_token_file` it answers only to
/// that token (401 without, 403 with another one, the hs_token included).
#[tokio::test]
async fn metrics_with_a_token_file_answer_only_to_that_token() {
    let dir = tempfile::tempdir().unwrap();
    let app = metrics_app(dir.path(), "{bearer_token_file: metrics.token}");
    app.metrics().pin_failure();
    let router = app.router();
    let get = |token: Option<&str>| {
        let mut builder = Request::get("/metrics");
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.body(Body::empty()).unwrap()
    };
    let missing = call(&router, get(None)).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.errcode(), "M_UNAUTHORIZED");
    assert!(!missing.text.contains("pin_failures"), "{}", missing.text);
    let hs_token = app.registration().hs_token.expose().to_owned();
    for wrong in ["scrape-token-2", "scrape-token-1x", hs_token.as_str()] {
        let refused = call(&router, get(Some(wrong))).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{wrong}");
        assert!(!refused.text.contains("pin_failures"), "{}", refused.text);
    }
    let ok = call(&router, get(Some("scrape-token-1"))).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(
        ok.text.contains("mxpay_pin_failures_total 1"),
        "{}",
        ok.text
    );
    // The other operations endpoints stay open (health checks carry no token).
    let health = call(
        &router,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(health.status, StatusCode::OK);
}

/// With `metrics.listen`, `/metrics` moves to its own router and the appservice listener no
/// longer serves it.
#[tokio::test]
async fn metrics_listen_moves_metrics_off_the_appservice_listener() {
    let dir = tempfile::tempdir().unwrap();
    let app = metrics_app(dir.path(), "{listen: '127.0.0.1:0'}");
    let get = |uri: &'static str| Request::get(uri).body(Body::empty()).unwrap();
    let edge = call(&app.router(), get("/metrics")).await;
    assert_eq!(edge.status, StatusCode::NOT_FOUND);
    assert!(!edge.text.contains("mxpay_"), "{}", edge.text);
    let metrics = call(&app.metrics_router(), get("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.text.contains("mxpay_pin_failures_total"));
    let elsewhere = call(&app.metrics_router(), get("/health")).await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND);
}

/// A token file others can read stops start-up, naming the key and the fix.
#[cfg(unix)]
#[tokio::test]
async fn a_metrics_token_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("metrics.token");
    std::fs::write(&token, "scrape-token-1\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut config = Config::from_yaml("metrics: {bearer_token_file: metrics.token}").unwrap();
    config.resolve_paths(dir.path());
    config.data_dir = dir.path().join("data");
    let registration = Registration::generate(&config);
    let message = App::open(config, registration).unwrap_err().to_string();
    assert!(
        message.contains("`metrics.bearer_token_file`")
            && message.contains(&format!("chmod 600 {}", token.display())),
        "{message}"
    );
    assert!(!message.contains("scrape-token-1"), "{message}");
}
