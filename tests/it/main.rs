//! The one integration test binary: each extra binary re-links matrix-sdk, which is slow.
#![recursion_limit = "256"]

mod admin;
mod bench_e2e;
mod config_errors;
mod crypto;
mod dev;
mod spine;
mod support;
mod webhooks;

mod homeserver_retry;

mod ledger;
mod lost_key;
mod merchants;
mod observability;
mod payments;

mod smoke {
    #[test]
    fn config_defaults_parse() {
        let config = mxpay::config::Config::from_yaml("{}").expect("empty config is valid");
        assert_eq!(config.ledger.currencies[0].code, "EUR");
    }
}
