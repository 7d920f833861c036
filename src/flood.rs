//! Bounds on refused admin and merchant API calls: a flood of calls without a valid token (or webhook
//! signature) must not fill the disk with audit lines nor the memory with per-peer state.
//!
//! Only *refused* calls are counted, per peer IP and overall, with `governor`'s GCRA limiters
//! (the engine under `tower_governor`). A tower layer in front of the router cannot do that: it
//! counts a call before the handler knows whether the token is good, so a flood would also
//! throttle the genuine admin. Here a genuine token is never limited; a refusal over the limit
//! is answered 429 `M_LIMIT_EXCEEDED` and gets no audit line of its own: the next audited call
//! is preceded by one summary line counting what was suppressed ([`RefusalGate::check`],
//! [`RefusalGate::take_suppressed`]).
//!
//! The limiters run on mxpay's injected [`Clock`](crate::clock::Clock), so tests move time
//! instead of sleeping.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};

use crate::clock::SharedClock;

/// The peer's IP address, when the server was started with connect info (`mxpay serve` is);
/// `None` for in-process calls. Only the TCP peer counts: a forwarded-for header is the
/// caller's own text. The admin and merchant APIs count refused calls by it.
pub(crate) struct Peer(pub(crate) Option<IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|axum::extract::ConnectInfo(addr)| addr.ip()),
        ))
    }
}

/// Most peers whose refusals are tracked at once. Past it, stale peers are dropped; if all are
/// recent (a flood from many addresses), a new peer is held only to the overall limit, so the
/// tracking state stays bounded.
pub const PEERS_TRACKED_MAX: usize = 10_000;

type NoOp = NoOpMiddleware<Nanos>;

/// mxpay's clock as a `governor` clock (nanoseconds; mxpay's clock has millisecond steps).
#[derive(Clone)]
struct InjectedClock(SharedClock);

impl GovernorClock for InjectedClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.now_ms().saturating_mul(1_000_000))
    }
}

/// Who is counted as one peer: an IPv4 address, or an IPv6 /64 (one customer's network: a
/// single host can use every address in its /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    V4(u32),
    V6Net(u64),
}

impl PeerKey {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => Self::V6Net((u128::from(v6) >> 64) as u64),
        }
    }
}

/// What to do with a refused call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Answer and audit it; first write a summary of `suppressed_before` refusals that were
    /// answered 429 without an audit line since the last audited one (0: none).
    Admit {
        /// Refusals suppressed since the last admitted one.
        suppressed_before: u64,
    },
    /// Over the limit: answer 429 `M_LIMIT_EXCEEDED` with this wait, write no audit line.
    Limit {
        /// How long until a refusal from this peer would be admitted again, in ms.
        retry_after_ms: u64,
    },
}

/// The limits on refused calls (`admin.refused_calls_per_peer_per_min`,
/// `admin.refused_calls_per_min`).
pub struct RefusalGate {
    per_peer: RateLimiter<PeerKey, HashMapStateStore<PeerKey>, InjectedClock, NoOp>,
    total: RateLimiter<NotKeyed, InMemoryState, InjectedClock, NoOp>,
    clock: InjectedClock,
    suppressed: AtomicU64,
}

impl std::fmt::Debug for RefusalGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalGate")
            .field("peers", &self.per_peer.len())
            .field("suppressed", &self.suppressed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RefusalGate {
    /// A gate admitting `per_peer_per_min` refusals a minute from one peer and
    /// `total_per_min` from everyone, each also as a burst.
    pub fn new(
        per_peer_per_min: NonZeroU32,
        total_per_min: NonZeroU32,
        clock: SharedClock,
    ) -> Self {
        let clock = InjectedClock(clock);
        Self {
            per_peer: RateLimiter::hashmap_with_clock(
                Quota::per_minute(per_peer_per_min),
                clock.clone(),
            ),
            total: RateLimiter::direct_with_clock(Quota::per_minute(total_per_min), clock.clone()),
            clock,
            suppressed: AtomicU64::new(0),
        }
    }

    /// Counts one refused call from `peer` (`None`: not known, as in-process calls; only the
    /// overall limit applies) and says whether to answer and audit it or to answer 429.
    pub fn check(&self, peer: Option<IpAddr>) -> Gate {
        let limited = |not_until: NotUntil<Nanos>| {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            let wait = not_until.wait_time_from(self.clock.now());
            // At least 1 ms: a client told to wait 0 ms would retry at once.
            let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            Gate::Limit { retry_after_ms }
        };
        if let Some(key) = peer.map(PeerKey::of) {
            if self.per_peer.len() >= PEERS_TRACKED_MAX {
                self.per_peer.retain_recent();
            }
            if self.per_peer.len() < PEERS_TRACKED_MAX {
                if let Err(not_until) = self.per_peer.check_key(&key) {
                    return limited(not_until);
                }
            }
        }
        if let Err(not_until) = self.total.check() {
            return limited(not_until);
        }
        Gate::Admit {
            suppressed_before: self.suppressed.swap(0, Ordering::Relaxed),
        }
    }

    /// Takes the count of refusals answered 429 since the last admitted one (resetting it), so
    /// the next audit line of any call can be preceded by the line that counts them.
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Ordering::Relaxed)
    }

    /// How many peers are tracked now (for tests of the bound).
    pub fn peers_tracked(&self) -> usize {
        self.per_peer.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;

    fn gate(per_peer: u32, total: u32, clock: &ManualClock) -> RefusalGate {
        RefusalGate::new(
            NonZeroU32::new(per_peer).unwrap(),
            NonZeroU32::new(total).unwrap(),
            Arc::new(clock.clone()),
        )
    }

    fn v4(last: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    #[test]
    fn a_peer_gets_its_burst_then_waits_and_the_suppressed_are_counted() {
        let clock = ManualClock::new(1_795_000_000_000);
        let gate = gate(3, 100, &clock);
        for _ in 0..3 {
            assert_eq!(
                gate.check(v4(1)),
                Gate::Admit {
                    suppressed_before: 0
                }
            );
        }
        // One refusal every 20 s refills (3 a minute).
        assert_eq!(
            gate.check(v4(1)),
            Gate::Limit {
                retry_after_ms: 20_000
            }
        );
        clock.advance_ms(5_000);
        assert_eq!(
            gate.check(v4(1)),
            Gate::Limit {
                retry_after_ms: 15_000
            }
        );
        // Another peer is not affected, and reports what was suppressed.
        assert_eq!(
            gate.check(v4(2)),
            Gate::Admit {
                suppressed_before: 2
            }
        );
        clock.advance_ms(15_000);
        assert_eq!(
            gate.check(v4(1)),
            Gate::Admit {
                suppressed_before: 0
            }
        );
    }

    #[test]
    fn the_overall_limit_holds_across_peers_and_unknown_peers() {
        let clock = ManualClock::new(1_795_000_000_000);
        let gate = gate(3, 4, &clock);
        for last in 0..4 {
            assert!(matches!(gate.check(v4(last)), Gate::Admit { .. }));
        }
        assert!(matches!(gate.check(v4(9)), Gate::Limit { .. }));
        assert!(matches!(gate.check(None), Gate::Limit { .. }));
        clock.advance_ms(15_000);
        assert_eq!(
            gate.check(None),
            Gate::Admit {
                suppressed_before: 2
            }
        );
    }

    #[test]
    fn an_ipv6_slash_64_is_one_peer_and_tracking_stays_bounded() {
        let clock = ManualClock::new(1_795_000_000_000);
        let gate = gate(1, u32::MAX, &clock);
        let host = |low: u64| {
            Some(IpAddr::V6(Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | u128::from(low),
            )))
        };
        assert!(matches!(gate.check(host(1)), Gate::Admit { .. }));
        assert!(matches!(gate.check(host(2)), Gate::Limit { .. }));
        // An IPv4-mapped address counts as the IPv4 peer.
        assert!(matches!(gate.check(v4(7)), Gate::Admit { .. }));
        let mapped = Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped();
        assert!(matches!(
            gate.check(Some(IpAddr::V6(mapped))),
            Gate::Limit { .. }
        ));
        // Many distinct peers: never more than the bound tracked.
        for i in 0..(PEERS_TRACKED_MAX as u32 + 50) {
            gate.check(Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))));
        }
        assert!(gate.peers_tracked() <= PEERS_TRACKED_MAX);
    }
}
