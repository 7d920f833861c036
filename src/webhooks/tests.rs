//! Delivery against local HTTP receivers: a real axum receiver that checks the signature with
//! [`verify_signature`], wiremock for the faults (down, slow, 500 then 200, 410, redirect),
//! and restarts over the same sled directory. The receiver is the peer here, so no Synapse.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::schedule::{DeliveryState, WebhookPolicy};
use super::store::WebhookStore;
use super::worker::{WebhookOutbox, WebhookPoke, WebhookWorker};
use super::*;
use crate::clock::{Clock, ManualClock, SystemClock};

const SECRET: &[u8] = b"whsec_test_0123456789abcdefghijklmnopqrstuvwxyz";

/// Endpoints a test can change while the worker runs.
#[derive(Default)]
struct TestEndpoints(Mutex<HashMap<String, Endpoint>>);

impl TestEndpoints {
    fn set(&self, merchant_id: &str, url: &str) {
        self.0.lock().insert(
            merchant_id.to_owned(),
            Endpoint {
                url: url.parse().unwrap(),
                secret: EndpointSecret::new(SECRET),
            },
        );
    }
}

impl WebhookEndpoints for TestEndpoints {
    fn endpoint(&self, merchant_id: &str) -> Option<Endpoint> {
        self.0.lock().get(merchant_id).cloned()
    }
}

fn policy() -> WebhookPolicy {
    WebhookPolicy {
        poll_ms: 10,
        timeout_ms: 1_000,
        backoff_base_ms: 1_000,
        backoff_cap_ms: 60_000,
        retry_total_ms: 600_000,
        ..WebhookPolicy::default()
    }
}

/// A store, an outbox over it and a worker, with a manual clock standing at real time (so a
/// receiver checking the signed time against its own clock accepts it).
struct Rig {
    _dir: Option<tempfile::TempDir>,
    outbox: WebhookOutbox,
    clock: ManualClock,
    endpoints: Arc<TestEndpoints>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Rig {
    fn start(dir: tempfile::TempDir, policy: WebhookPolicy) -> Self {
        let mut rig = Self::start_in(dir.path(), policy, Arc::default());
        rig._dir = Some(dir);
        rig
    }

    fn start_in(
        dir: &std::path::Path,
        policy: WebhookPolicy,
        endpoints: Arc<TestEndpoints>,
    ) -> Self {
        let store = WebhookStore::open(dir, policy).unwrap();
        let clock = ManualClock::new(SystemClock.now_ms());
        let poke = WebhookPoke::default();
        let outbox = WebhookOutbox::new(store.clone(), Arc::new(clock.clone()), poke.clone());
        let (stop, stopped) = watch::channel(false);
        let task = WebhookWorker::new(store, endpoints.clone(), Arc::new(clock.clone()), poke)
            .spawn(stopped);
        Self {
            _dir: None,
            outbox,
            clock,
            endpoints,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
    }

    async fn enqueue(&self, merchant_id: &str, event_id: &str) {
        self.outbox
            .enqueue(
                merchant_id,
                EventType::InvoicePaid,
                event_id,
                serde_json::json!({"invoice": {"id": event_id, "status": "paid", "amount": "4.50", "currency": "EUR"}}),
            )
            .await
            .unwrap();
    }

    fn record(&self, event_id: &str) -> DeliveryRecord {
        self.outbox.store().get(event_id).unwrap().unwrap()
    }

    /// Waits (bounded: the test fails rather than hangs) until `event_id`'s record satisfies
    /// `done`.
    async fn wait_for(
        &self,
        event_id: &str,
        done: impl Fn(&DeliveryRecord) -> bool,
    ) -> DeliveryRecord {
        for _ in 0..3_000 {
            let record = self.record(event_id);
            if done(&record) {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{event_id} never got there: {:?}", self.record(event_id));
    }

    /// Moves the clock to `event_id`'s next attempt and wakes the worker.
    fn jump_to_next_attempt(&self, event_id: &str) {
        let due = self.record(event_id).next_attempt_at_ms;
        self.clock.set_ms(due.max(self.clock.now_ms()));
        self.outbox.poke_worker();
    }
}

/// What the real receiver saw: (event id header, body) of each request it accepted, and how
/// many it refused.
#[derive(Default)]
struct Received {
    accepted: Vec<(String, String)>,
    refused: usize,
}

/// A merchant's receiver as docs/webhooks.md tells them to write it: verify, then dedupe by
/// event id, then 2xx.
async fn start_receiver() -> (String, Arc<Mutex<Received>>) {
    use axum::http::{HeaderMap, StatusCode};
    let received = Arc::new(Mutex::new(Received::default()));
    let state = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let header = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
                let now_s = SystemClock.now_ms() / 1_000;
                if verify_signature(SECRET, header, &body, now_s, DEFAULT_TOLERANCE_S).is_err() {
                    state.lock().refused += 1;
                    return StatusCode::BAD_REQUEST;
                }
                let event_id = headers
                    .get(EVENT_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = String::from_utf8(body.to_vec()).unwrap();
                state.lock().accepted.push((event_id, body));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test]
async fn a_real_receiver_verifies_the_signature_and_gets_the_body() {
    let (url, received) = start_receiver().await;
    let rig = Rig::start(tempfile::tempdir().unwrap(), policy());
    rig.endpoints.set("cafe", &url);
    rig.enqueue("cafe", "evt_a").await;
    let record = rig
        .wait_for("evt_a", |r| r.state == DeliveryState::Delivered)
        .await;
    assert_eq!(record.attempts, 1);
    assert_eq!(record.last_status, Some(204));
    let received = std::mem::take(&mut *received.lock());
    assert_eq!(received.refused, 0);
    assert_eq!(received.accepted.len(), 1);
    let (event_id, body) = &received.accepted[0];
    assert_eq!(event_id, "evt_a");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["id"], "evt_a");
    assert_eq!(body["type"], "invoice.paid");
    assert!(body["created_ms"].is_u64());
    assert_eq!(body["data"]["invoice"]["amount"], "4.50");
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["created_ms", "data", "id", "type"]);
    rig.stop().await;
}

#[tokio::test]
async fn a_receiver_with_another_secret_refuses_and_the_event_is_retried() {
    let (url, received) = start_receiver().await;
    let rig = Rig::start(tempfile::tempdir().unwrap(), policy());
    rig.endpoints.0.lock().insert(
        "cafe".into(),
        Endpoint {
            url: url.parse().unwrap(),
            secret: EndpointSecret::new(b"not-the-receivers-secret".to_vec()),
        },
    );
    rig.enqueue("cafe", "evt_b").await;
    let record = rig.wait_for("evt_b", |r| r.attempts == 1).await;
    assert_eq!(record.state, DeliveryState::Pending);
    assert_eq!(record.last_status, Some(400));
    assert_eq!(received.lock().refused, 1);
    // The merchant fixes the secret: the next attempt is accepted.
    rig.endpoints.set("cafe", &url);
    rig.jump_to_next_attempt("evt_b");
    rig.wait_for("evt_b", |r| r.state == DeliveryState::Delivered)
        .await;
    assert_eq!(received.lock().accepted.len(), 1);
    rig.stop().await;
}

#[tokio::test]
async fn a_500_then_a_200_delivers_the_same_body_under_the_same_id() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let rig = Rig::start(tempfile::tempdir().unwrap(), policy());
    rig.endpoints.set("cafe", &format!("{}/hook", server.uri()));
    rig.enqueue("cafe", "evt_c").await;
    let first = rig.wait_for("evt_c", |r| r.attempts == 1).await;
    assert_eq!(first.state, DeliveryState::Pending);
    assert_eq!(first.last_status, Some(500));
    assert_eq!(first.last_error.as_deref(), Some("http_status"));
    let waited_ms = first.next_attempt_at_ms - first.last_attempt_ms.unwrap();
    assert_eq!(
        waited_ms, 1_000,
        "the first wait is the base: its jitter window is empty"
    );
    rig.jump_to_next_attempt("evt_c");
    let done = rig
        .wait_for("evt_c", |r| r.state == DeliveryState::Delivered)
        .await;
    assert_eq!((done.attempts, done.last_status), (2, Some(200)));
    assert_eq!(done.last_error, None);
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].body, requests[1].body, "the same body");
    for request in &requests {
        assert_eq!(request.headers.get(EVENT_ID_HEADER).unwrap(), "evt_c");
        let header = request
            .headers
            .get(SIGNATURE_HEADER)
            .unwrap()
            .to_str()
            .unwrap();
        verify_signature(
            SECRET,
            Some(header),
            &request.body,
            rig.clock.now_ms() / 1000,
            300,
        )
        .unwrap();
    }
    rig.stop().await;
}

#[tokio::test]
async fn a_410_fails_the_event_at_once_with_no_more_attempts() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(410))
        .mount(&server)
        .await;
    let rig = Rig::start(tempfile::tempdir().unwrap(), policy());
    rig.endpoints.set("cafe", &format!("{}/hook", server.uri()));
    rig.enqueue("cafe", "evt_d").await;
    let record = rig
        .wait_for("evt_d", |r| r.state == DeliveryState::Failed)
        .await;
    assert_eq!(record.attempts, 1);
    assert_eq!(record.last_error.as_deref(), Some("receiver_gone"));
    assert!(rig
        .outbox
        .store()
        .due(u64::MAX, 10, |_, _| false)
        .unwrap()
        .is_empty());
    // Nothing after it either: another event of the same merchant is attempted once too.
    rig.clock.advance_ms(86_400_000);
    rig.enqueue("cafe", "evt_d2").await;
    rig.wait_for("evt_d2", |r| r.state == DeliveryState::Failed)
        .await;
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
    assert_eq!(rig.record("evt_d").attempts, 1);
    // An operator's replay sends it again.
    let (replayed, changed) = rig.outbox.replay("evt_d", None).await.unwrap();
    assert!(changed);
    assert_eq!(replayed.state, DeliveryState::Pending);
    rig.wait_for("evt_d", |r| r.state == DeliveryState::Failed)
        .await;
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    rig.stop().await;
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_counts_as_a_failed_attempt() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(
            ResponseTemplate::new(302)
                .insert_header("location", format!("{}/elsewhere", server.uri())),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/elsewhere"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let rig = Rig::start(tempfile::tempdir().unwrap(), policy());
    rig.endpoints.set("cafe", &format!("{}/hook", server.uri()));
    rig.enqueue("cafe", "evt_e").await;
    let record = rig.wait_for("evt_e", |r| r.attempts == 1).await;
    assert_eq!(record.state, DeliveryState::Pending);
    assert_eq!(record.last_status, Some(302));
    assert_eq!(record.last_error.as_deref(), Some("redirect_not_followed"));
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    rig.stop().await;
    server.verify().await;
}

#[tokio::test]
async fn a_slow_receiver_times_out_and_a_closed_port_fails_after_the_retry_time() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    // A port nothing listens on: bound, then closed.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let rig = Rig::start(tempfile::tempdir().unwrap(), policy());
    rig.endpoints.set("slow", &format!("{}/hook", server.uri()));
    rig.endpoints.set("down", &format!("http://{closed}/hook"));
    rig.enqueue("slow", "evt_slow").await;
    rig.enqueue("down", "evt_down").await;
    let slow = rig.wait_for("evt_slow", |r| r.attempts == 1).await;
    assert_eq!(slow.last_error.as_deref(), Some("timeout"));
    assert_eq!(slow.last_status, None);
    assert_eq!(slow.state, DeliveryState::Pending);
    let down = rig.wait_for("evt_down", |r| r.attempts == 1).await;
    assert_eq!(down.last_error.as_deref(), Some("connect_failed"));
    // Every attempt fails the same way until the retry time is over; the last one is made at
    // the deadline, then the event is failed and kept.
    let deadline_ms = down.retry_until_ms;
    for _ in 0..700 {
        let record = rig.record("evt_down");
        if record.state != DeliveryState::Pending {
            break;
        }
        let attempts = record.attempts;
        rig.jump_to_next_attempt("evt_down");
        rig.wait_for("evt_down", |r| r.attempts > attempts).await;
    }
    let failed = rig.record("evt_down");
    assert_eq!(failed.state, DeliveryState::Failed);
    assert_eq!(failed.finished_ms, Some(deadline_ms));
    assert_eq!(failed.last_error.as_deref(), Some("connect_failed"));
    // 10 min with waits between 1 s and 60 s (drawn at random): at least 10 attempts, at
    // most one a second.
    assert!((10..=601).contains(&failed.attempts), "{failed:?}");
    let failed_list = rig
        .outbox
        .list(
            ListFilter {
                state: Some(DeliveryState::Failed),
                merchant_id: None,
            },
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(failed_list.len(), 1);
    assert_eq!(failed_list[0].event_id, "evt_down");
    rig.stop().await;
}

/// A receiver that accepts connections and never answers: its deliveries hang until the
/// timeout (60 s here), and meanwhile another merchant's events still go out.
#[tokio::test]
async fn a_hanging_receiver_does_not_hold_up_other_merchants() {
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = connections.clone();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            sockets.push(socket);
        }
    });
    let (url, received) = start_receiver().await;
    let policy = WebhookPolicy {
        timeout_ms: 60_000,
        concurrency_max: 4,
        per_merchant_concurrency_max: 2,
        ..policy()
    };
    let rig = Rig::start(tempfile::tempdir().unwrap(), policy);
    rig.endpoints
        .set("hanging", &format!("http://{hanging_addr}/hook"));
    rig.endpoints.set("cafe", &url);
    for i in 0..6 {
        rig.enqueue("hanging", &format!("evt_h{i}")).await;
    }
    for i in 0..3 {
        rig.enqueue("cafe", &format!("evt_ok{i}")).await;
    }
    for i in 0..3 {
        rig.wait_for(&format!("evt_ok{i}"), |r| {
            r.state == DeliveryState::Delivered
        })
        .await;
    }
    assert_eq!(received.lock().accepted.len(), 3);
    // The hanging merchant's attempts are still in flight (none answered, none recorded), and
    // at most two of them were started.
    for i in 0..6 {
        assert_eq!(rig.record(&format!("evt_h{i}")).attempts, 0);
    }
    assert!(connections.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    rig.stop().await;
    held.abort();
}

#[tokio::test]
async fn an_unknown_merchant_waits_on_the_schedule_until_its_endpoint_appears() {
    let (url, received) = start_receiver().await;
    let rig = Rig::start(tempfile::tempdir().unwrap(), policy());
    rig.enqueue("newshop", "evt_f").await;
    let record = rig.wait_for("evt_f", |r| r.attempts == 1).await;
    assert_eq!(record.state, DeliveryState::Pending);
    assert_eq!(record.last_error.as_deref(), Some("endpoint_unavailable"));
    rig.endpoints.set("newshop", &url);
    rig.jump_to_next_attempt("evt_f");
    rig.wait_for("evt_f", |r| r.state == DeliveryState::Delivered)
        .await;
    assert_eq!(received.lock().accepted.len(), 1);
    rig.stop().await;
}

#[tokio::test]
async fn after_a_restart_pending_events_go_out_and_delivered_ones_are_not_sent_again() {
    let (url, received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoints: Arc<TestEndpoints> = Arc::default();
    endpoints.set("cafe", &url);
    let rig = Rig::start_in(dir.path(), policy(), endpoints.clone());
    rig.enqueue("cafe", "evt_1").await;
    rig.wait_for("evt_1", |r| r.state == DeliveryState::Delivered)
        .await;
    rig.stop().await;

    // Written while no worker ran (as if mxpay stopped right after the producer's enqueue),
    // and the producer feeds its source again after the crash: evt_1 is not new.
    {
        let store = WebhookStore::open(dir.path(), policy()).unwrap();
        let now_ms = SystemClock.now_ms();
        assert!(matches!(
            store
                .enqueue(
                    "cafe",
                    EventType::InvoicePaid,
                    "evt_1",
                    serde_json::json!({}),
                    now_ms
                )
                .unwrap(),
            Enqueued::Exists(_)
        ));
        store
            .enqueue(
                "cafe",
                EventType::RefundSucceeded,
                "evt_2",
                serde_json::json!({}),
                now_ms,
            )
            .unwrap();
    }

    let rig = Rig::start_in(dir.path(), policy(), endpoints);
    rig.wait_for("evt_2", |r| r.state == DeliveryState::Delivered)
        .await;
    rig.enqueue("cafe", "evt_3").await;
    rig.wait_for("evt_3", |r| r.state == DeliveryState::Delivered)
        .await;
    let ids: Vec<String> = received
        .lock()
        .accepted
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(ids, ["evt_1", "evt_2", "evt_3"], "each once");
    rig.stop().await;
}

#[test]
fn event_ids_are_derived_from_their_source() {
    let a = derive_event_id(EventType::InvoicePaid, "inv_1");
    assert_eq!(a, derive_event_id(EventType::InvoicePaid, "inv_1"));
    assert_ne!(a, derive_event_id(EventType::InvoiceExpired, "inv_1"));
    assert_ne!(a, derive_event_id(EventType::InvoicePaid, "inv_2"));
    assert!(a.starts_with("evt_") && a.len() == 36, "{a}");
}

#[test]
fn signature_round_trip_and_what_a_receiver_refuses() {
    let body = br#"{"id":"evt_1","type":"invoice.paid","created_ms":1,"data":{}}"#;
    let header = sign(SECRET, 1_000, body);
    verify_signature(SECRET, Some(&header), body, 1_000, 300).unwrap();
    verify_signature(SECRET, Some(&header), body, 1_300, 300).unwrap();
    use crate::signature::SignatureError as E;
    let tampered = String::from_utf8(body.to_vec())
        .unwrap()
        .replace("paid", "gone");
    assert_eq!(
        verify_signature(SECRET, Some(&header), tampered.as_bytes(), 1_000, 300),
        Err(E::Mismatch)
    );
    assert_eq!(
        verify_signature(b"other", Some(&header), body, 1_000, 300),
        Err(E::Mismatch)
    );
    assert_eq!(
        verify_signature(SECRET, Some(&header), body, 1_301, 300),
        Err(E::Stale {
            age_s: 301,
            tolerance_s: 300
        })
    );
    // The old MAC under a fresh timestamp does not verify.
    let mac = header.split_once(",v1=").unwrap().1;
    assert_eq!(
        verify_signature(SECRET, Some(&format!("t=2000,v1={mac}")), body, 2_000, 300),
        Err(E::Mismatch)
    );
    assert_eq!(
        verify_signature(SECRET, None, body, 1_000, 300),
        Err(E::Missing)
    );
    assert_eq!(
        verify_signature(SECRET, Some("v1=00"), body, 1_000, 300),
        Err(E::Malformed)
    );
}

#[test]
fn the_secret_never_shows_in_debug_output() {
    let endpoint = Endpoint {
        url: "https://shop.example/hook".parse().unwrap(),
        secret: EndpointSecret::new(SECRET),
    };
    let debug = format!("{endpoint:?} {endpoint:#?}");
    assert!(!debug.contains("whsec_test"), "{debug}");
    assert!(debug.contains("redacted"));
}

/// The Python snippet of docs/webhooks.md, run by python3 against a body and header this code
/// produced: it must accept them, and refuse a changed body. Skipped (with a note) where there
/// is no python3.
#[test]
fn the_python_snippet_in_the_docs_verifies_what_mxpay_signs() {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/webhooks.md"),
    )
    .unwrap();
    let snippet = docs
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("docs/webhooks.md has a python snippet");
    let body = br#"{"id":"evt_py","type":"invoice.paid","created_ms":1,"data":{"invoice":{"id":"inv_1","memo":"caf\u00e9 \u2615"}}}"#;
    let now_s = SystemClock.now_ms() / 1_000;
    let header = sign(SECRET, now_s, body);
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{snippet}\n\nimport sys\n\
         secret = open(sys.argv[1], 'rb').read()\n\
         body = open(sys.argv[2], 'rb').read()\n\
         print('ok' if verify_signature(secret, sys.argv[3], body) else 'refused')\n"
    );
    std::fs::write(dir.path().join("check.py"), script).unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    std::fs::write(dir.path().join("body"), body).unwrap();
    let mut tampered = body.to_vec();
    tampered[10] ^= 1;
    std::fs::write(dir.path().join("tampered"), tampered).unwrap();
    let run = |body_file: &str, header: &str| {
        std::process::Command::new("python3")
            .arg(dir.path().join("check.py"))
            .arg(dir.path().join("secret"))
            .arg(dir.path().join(body_file))
            .arg(header)
            .output()
    };
    let output = match run("body", &header) {
        Ok(output) => output,
        Err(e) => {
            eprintln!("python3 is not available ({e}): the Python snippet was not checked");
            return;
        }
    };
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
    let output = run("tampered", &header).unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "refused");
    let old = sign(SECRET, now_s - 3_600, body);
    let output = run("body", &old).unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "refused");
}

// docs/webhooks.md: standalone Rust verification (hmac, sha2, hex), verbatim.
fn verify(secret: &[u8], header: &str, body: &[u8], now_s: u64) -> bool {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    let (mut t, mut macs) = (None, Vec::new());
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => macs.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    // verify_slice compares in constant time.
    macs.iter().any(|m| mac.clone().verify_slice(m).is_ok()) && now_s.abs_diff(t) <= 300
}

/// The standalone Rust snippet of docs/webhooks.md is this file's `verify` (its body, line by
/// line), and it accepts what mxpay signs and refuses a changed body or an old timestamp.
#[test]
fn the_standalone_rust_snippet_in_the_docs_verifies_what_mxpay_signs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read_to_string(root.join("docs/webhooks.md")).unwrap();
    let source = std::fs::read_to_string(root.join("src/webhooks/tests.rs")).unwrap();
    let body_of = |text: &str| -> Vec<String> {
        let start = text
            .find("fn verify(secret: &[u8], header: &str")
            .expect("the snippet");
        text[start..]
            .lines()
            .take_while(|l| *l != "}")
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.starts_with("use "))
            .collect()
    };
    assert_eq!(body_of(&docs), body_of(&source));
    let body = br#"{"id":"evt_1","type":"invoice.paid","created_ms":1,"data":{}}"#;
    let header = sign(SECRET, 5_000, body);
    assert!(verify(SECRET, &header, body, 5_100));
    assert!(!verify(SECRET, &header, b"{}", 5_100));
    assert!(!verify(SECRET, &header, body, 5_301));
    assert!(!verify(b"other", &header, body, 5_000));
}

/// `has_room` answers exactly what `enqueue` would: refused per merchant at
/// `pending_per_merchant_max`, in all at `records_max` with nothing delivered to prune; room
/// again once an event is delivered.
#[test]
fn has_room_says_what_enqueue_would_do() {
    let dir = tempfile::tempdir().unwrap();
    let store = WebhookStore::open(
        dir.path(),
        WebhookPolicy {
            pending_per_merchant_max: 1,
            records_max: 100,
            ..policy()
        },
    )
    .unwrap();
    let data = serde_json::json!({});
    assert!(store.has_room("cafe").is_ok());
    store
        .enqueue("cafe", EventType::InvoicePaid, "evt_1", data.clone(), 1)
        .unwrap();
    let full = store.has_room("cafe").unwrap_err();
    assert_eq!(full.code(), "merchant_queue_full");
    assert_eq!(
        store
            .enqueue("cafe", EventType::InvoicePaid, "evt_2", data.clone(), 1)
            .unwrap_err()
            .code(),
        "merchant_queue_full"
    );
    assert!(store.has_room("shop").is_ok(), "another merchant has room");
    store
        .update("evt_1", |r| {
            r.state = DeliveryState::Delivered;
            r.finished_ms = Some(2);
            true
        })
        .unwrap();
    assert!(store.has_room("cafe").is_ok());
    // In all: 100 records, none delivered, is full for everyone.
    for i in 0..99 {
        store
            .enqueue(
                &format!("m{i}"),
                EventType::InvoicePaid,
                &format!("evt_m{i}"),
                data.clone(),
                3,
            )
            .unwrap();
    }
    assert!(
        store.has_room("other").is_ok(),
        "a delivered one can be pruned"
    );
    store
        .enqueue(
            "other",
            EventType::InvoicePaid,
            "evt_other",
            data.clone(),
            4,
        )
        .unwrap();
    assert_eq!(store.has_room("new").unwrap_err().code(), "queue_full");
}
