//! PINs: a 4-digit secret per user, stored argon2id-hashed with a salt and a server-side pepper,
//! guarded by a lockout that grows with each run of wrong attempts.
//!
//! The order of a check follows vaultwarden's protected actions: the attempt is recorded
//! *before* the comparison ([`PinRecord::begin_attempt`]), so a crash or a killed request
//! between "compare" and "record" cannot give an attacker a free try; the comparison itself is
//! constant-time (argon2's verifier compares the outputs with `subtle`).

use std::fmt;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};
use serde::{Deserialize, Serialize};

/// Wrong PINs in a row that lock the PIN.
pub const PIN_ATTEMPTS_MAX: u32 = 5;
/// The first lockout's length; each further lockout doubles it, up to [`PIN_LOCKOUT_MAX_MS`].
pub const PIN_LOCKOUT_BASE_MS: u64 = 60_000;
/// The longest lockout.
pub const PIN_LOCKOUT_MAX_MS: u64 = 24 * 60 * 60 * 1000;

/// A PIN as typed: exactly four ASCII digits. Its Debug form is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Pin([u8; 4]);

impl Pin {
    /// Parses a PIN; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, PinError> {
        let digits = text.trim().as_bytes();
        match digits {
            [a, b, c, d] if digits.iter().all(u8::is_ascii_digit) => Ok(Pin([*a, *b, *c, *d])),
            _ => Err(PinError::NotFourDigits),
        }
    }
}

impl Pin {
    /// Whether this PIN may be chosen as a new PIN: refuses the PINs an attacker tries first
    /// (NIST SP 800-63B §5.1.1.2 asks verifiers to refuse commonly used and repetitive or
    /// sequential secrets). With 5 tries per lockout, a PIN from a short guess list falls fast.
    pub fn check_choosable(&self) -> Result<(), PinError> {
        match weakness(&self.0) {
            Some(weakness) => Err(PinError::TooEasy(weakness)),
            None => Ok(()),
        }
    }
}

/// Why a PIN is too easy to guess to be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinWeakness {
    /// All four digits are the same (`0000`, `7777`).
    Repeated,
    /// The digits go up or down by one (`1234`, `9876`).
    Sequential,
    /// Among the most used 4-digit PINs (`1212`, `6969`).
    Common,
}

/// The most used 4-digit PINs that are neither repeated nor sequential: the top 20 of
/// DataGenetics' analysis of 3.4 million PINs (2012) without those two kinds, which
/// [`weakness`] catches by rule.
const COMMON_PINS: [&[u8; 4]; 8] = [
    b"1212", b"1004", b"2000", b"6969", b"1122", b"1313", b"2001", b"1010",
];

/// Whether `digits` (four ASCII digits) are a guessable PIN, and why. Pure.
fn weakness(digits: &[u8; 4]) -> Option<PinWeakness> {
    let steps: Vec<i16> = digits
        .windows(2)
        .map(|pair| i16::from(pair[1]) - i16::from(pair[0]))
        .collect();
    if steps.iter().all(|&step| step == 0) {
        Some(PinWeakness::Repeated)
    } else if steps.iter().all(|&step| step == 1) || steps.iter().all(|&step| step == -1) {
        Some(PinWeakness::Sequential)
    } else if COMMON_PINS.contains(&digits) {
        Some(PinWeakness::Common)
    } else {
        None
    }
}

impl fmt::Display for PinWeakness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PinWeakness::Repeated => "its four digits are the same",
            PinWeakness::Sequential => "its digits run in sequence",
            PinWeakness::Common => "it is one of the most used PINs",
        })
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        // Best effort: the PIN does not outlive its use in this struct.
        self.0 = [0; 4];
    }
}

/// Why a PIN operation failed. Never says which digit or part was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    /// Not exactly four digits.
    #[error("a PIN is exactly 4 digits")]
    NotFourDigits,
    /// The PIN did not match.
    #[error("wrong PIN")]
    Wrong {
        /// Attempts left before the PIN locks.
        attempts_left: u32,
    },
    /// Too many wrong attempts; try again later.
    #[error("PIN locked after too many wrong attempts; try again in {}", human_duration(*remaining_ms))]
    Locked {
        /// How long until the lock lifts.
        remaining_ms: u64,
    },
    /// An admin reset the PIN, or it was never set.
    #[error("no PIN is set; set one with `!pin set` in your private chat with the bot")]
    NotSet,
    /// A new PIN that is too easy to guess (NIST SP 800-63B blocklist): choose another.
    #[error(
        "That PIN is too easy to guess ({0}): it is among the first an attacker tries, and NIST SP \
         800-63B asks to refuse such PINs. Send a different 4-digit PIN."
    )]
    TooEasy(PinWeakness),
    /// The pepper is missing or the stored hash is unreadable: an operator problem.
    #[error("the PIN store is misconfigured")]
    Misconfigured,
}

/// Formats a duration for people: "45 seconds", "2 minutes", "3 hours".
pub fn human_duration(duration_ms: u64) -> String {
    let seconds = duration_ms.div_ceil(1000);
    if seconds < 120 {
        format!("{seconds} seconds")
    } else if seconds < 2 * 3600 {
        format!("{} minutes", seconds.div_ceil(60))
    } else {
        format!("{} hours", seconds.div_ceil(3600))
    }
}

/// The server-side pepper: argon2's secret input, kept outside the database (config or
/// environment), so a copied database alone is not enough to try all 10,000 PINs offline.
#[derive(Clone)]
pub struct Pepper(Vec<u8>);

impl Pepper {
    /// Wraps pepper bytes; at least 32.
    pub fn new(bytes: Vec<u8>) -> Result<Self, PinError> {
        if bytes.len() < 32 {
            return Err(PinError::Misconfigured);
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper(<redacted>)")
    }
}

/// Hashes and checks PINs with argon2id (OWASP's parameters: 19 MiB, 2 passes, 1 lane).
#[derive(Debug, Clone)]
pub struct PinHasher {
    pepper: Pepper,
    params: Params,
}

impl PinHasher {
    /// A hasher with the recommended parameters.
    pub fn new(pepper: Pepper) -> Self {
        let params = Params::new(19 * 1024, 2, 1, None).expect("constant argon2 parameters");
        Self { pepper, params }
    }

    fn argon2(&self) -> Result<Argon2<'_>, PinError> {
        Argon2::new_with_secret(
            &self.pepper.0,
            Algorithm::Argon2id,
            Version::V0x13,
            self.params.clone(),
        )
        .map_err(|_| PinError::Misconfigured)
    }

    /// Hashes `pin` with a fresh salt into a PHC string (`$argon2id$v=19$...`).
    pub fn hash(&self, pin: &Pin) -> Result<String, PinError> {
        let salt = SaltString::generate(&mut OsRng);
        self.argon2()?
            .hash_password(&pin.0, &salt)
            .map(|hash| hash.to_string())
            .map_err(|_| PinError::Misconfigured)
    }

    /// Whether `pin` matches `phc` (constant-time comparison).
    pub fn matches(&self, pin: &Pin, phc: &str) -> Result<bool, PinError> {
        let parsed = PasswordHash::new(phc).map_err(|_| PinError::Misconfigured)?;
        Ok(self.argon2()?.verify_password(&pin.0, &parsed).is_ok())
    }
}

/// A user's stored PIN state. Serialised into the store; holds no PIN, only its hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// argon2id PHC string; `None` after an admin reset.
    pub hash: Option<String>,
    /// Attempts begun since the last success or lockout, including one in flight.
    pub failed_in_row: u32,
    /// Lockouts so far (each doubles the next one); reset by a correct PIN.
    pub lockouts: u32,
    /// The lock lifts at this time (ms since epoch), if locked.
    pub locked_until_ms: Option<u64>,
}

impl fmt::Debug for PinRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinRecord")
            .field("set", &self.hash.is_some())
            .field("failed_in_row", &self.failed_in_row)
            .field("lockouts", &self.lockouts)
            .field("locked_until_ms", &self.locked_until_ms)
            .finish()
    }
}

impl PinRecord {
    /// A record for a freshly set PIN.
    pub fn new(hash: String) -> Self {
        Self {
            hash: Some(hash),
            failed_in_row: 0,
            lockouts: 0,
            locked_until_ms: None,
        }
    }

    /// Starts an attempt: refuses while locked, otherwise counts the attempt as failed until
    /// [`PinRecord::finish_attempt`] says otherwise. Persist the record after this call and
    /// before comparing.
    pub fn begin_attempt(&mut self, now_ms: u64) -> Result<(), PinError> {
        if self.hash.is_none() {
            return Err(PinError::NotSet);
        }
        if let Some(until_ms) = self.locked_until_ms {
            if now_ms < until_ms {
                return Err(PinError::Locked {
                    remaining_ms: until_ms - now_ms,
                });
            }
            self.locked_until_ms = None;
        }
        self.failed_in_row += 1;
        Ok(())
    }

    /// Ends an attempt begun with [`PinRecord::begin_attempt`]. Persist the record after.
    pub fn finish_attempt(&mut self, matched: bool, now_ms: u64) -> Result<(), PinError> {
        if matched {
            self.failed_in_row = 0;
            self.lockouts = 0;
            return Ok(());
        }
        if self.failed_in_row >= PIN_ATTEMPTS_MAX {
            let lockout_ms = PIN_LOCKOUT_BASE_MS
                .saturating_mul(1u64 << self.lockouts.min(20))
                .min(PIN_LOCKOUT_MAX_MS);
            self.lockouts += 1;
            self.failed_in_row = 0;
            self.locked_until_ms = Some(now_ms + lockout_ms);
            return Err(PinError::Locked {
                remaining_ms: lockout_ms,
            });
        }
        Err(PinError::Wrong {
            attempts_left: PIN_ATTEMPTS_MAX - self.failed_in_row,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher() -> PinHasher {
        PinHasher::new(Pepper::new(vec![7u8; 32]).unwrap())
    }

    #[test]
    fn only_four_digits_are_a_pin() {
        assert!(Pin::parse("1234").is_ok());
        assert!(Pin::parse(" 0000\n").is_ok());
        for bad in ["123", "12345", "12a4", "", "１２３４", "-123"] {
            assert_eq!(Pin::parse(bad), Err(PinError::NotFourDigits), "{bad}");
        }
        assert_eq!(
            format!("{:?}", Pin::parse("1234").unwrap()),
            "Pin(<redacted>)"
        );
    }

    /// The blocklist: repeated, sequential (up and down) and the most used PINs are refused
    /// with their reason; PINs near them are not.
    #[test]
    fn guessable_pins_cannot_be_chosen() {
        use PinWeakness::{Common, Repeated, Sequential};
        let cases = [
            ("0000", Some(Repeated)),
            ("1111", Some(Repeated)),
            ("2222", Some(Repeated)),
            ("4444", Some(Repeated)),
            ("7777", Some(Repeated)),
            ("9999", Some(Repeated)),
            ("0123", Some(Sequential)),
            ("1234", Some(Sequential)),
            ("2345", Some(Sequential)),
            ("6789", Some(Sequential)),
            ("9876", Some(Sequential)),
            ("4321", Some(Sequential)),
            ("3210", Some(Sequential)),
            ("1212", Some(Common)),
            ("1004", Some(Common)),
            ("2000", Some(Common)),
            ("6969", Some(Common)),
            ("4821", None),
            ("1357", None),
            ("5937", None),
            ("1235", None),
            ("7890", None),
            ("0001", None),
            ("2468", None),
            ("9157", None),
        ];
        for (text, expected) in cases {
            let pin = Pin::parse(text).unwrap();
            assert_eq!(
                pin.check_choosable(),
                expected.map_or(Ok(()), |weakness| Err(PinError::TooEasy(weakness))),
                "{text}"
            );
        }
        let sentence = PinError::TooEasy(Sequential).to_string();
        assert!(
            sentence.contains("too easy to guess") && sentence.contains("NIST SP 800-63B"),
            "{sentence}"
        );
    }

    #[test]
    fn hash_is_argon2id_salted_and_peppered() {
        let pin = Pin::parse("4821").unwrap();
        let first = hasher().hash(&pin).unwrap();
        let second = hasher().hash(&pin).unwrap();
        assert!(first.starts_with("$argon2id$"));
        assert!(!first.contains("4821"));
        assert_ne!(first, second, "salts differ");
        assert!(hasher().matches(&pin, &first).unwrap());
        assert!(!hasher()
            .matches(&Pin::parse("4822").unwrap(), &first)
            .unwrap());
        let other_pepper = PinHasher::new(Pepper::new(vec![8u8; 32]).unwrap());
        assert!(
            !other_pepper.matches(&pin, &first).unwrap(),
            "without the pepper the database alone does not verify"
        );
    }

    #[test]
    fn short_pepper_is_refused() {
        assert_eq!(
            Pepper::new(vec![1; 31]).unwrap_err(),
            PinError::Misconfigured
        );
    }

    #[test]
    fn five_wrong_in_a_row_lock_with_a_growing_delay() {
        let mut record = PinRecord::new("$argon2id$x".to_owned());
        let mut now_ms = 1_000;
        for attempt in 1..PIN_ATTEMPTS_MAX {
            record.begin_attempt(now_ms).unwrap();
            assert_eq!(
                record.finish_attempt(false, now_ms),
                Err(PinError::Wrong {
                    attempts_left: PIN_ATTEMPTS_MAX - attempt
                })
            );
        }
        record.begin_attempt(now_ms).unwrap();
        assert_eq!(
            record.finish_attempt(false, now_ms),
            Err(PinError::Locked {
                remaining_ms: PIN_LOCKOUT_BASE_MS
            })
        );
        now_ms += 1_000;
        assert_eq!(
            record.begin_attempt(now_ms),
            Err(PinError::Locked {
                remaining_ms: PIN_LOCKOUT_BASE_MS - 1_000
            })
        );
        now_ms += PIN_LOCKOUT_BASE_MS;
        for _ in 0..PIN_ATTEMPTS_MAX {
            record.begin_attempt(now_ms).unwrap();
            let _ = record.finish_attempt(false, now_ms);
        }
        assert_eq!(
            record.begin_attempt(now_ms),
            Err(PinError::Locked {
                remaining_ms: 2 * PIN_LOCKOUT_BASE_MS
            }),
            "the second lockout is twice as long"
        );
    }

    #[test]
    fn an_attempt_counts_before_the_comparison() {
        let mut record = PinRecord::new("$argon2id$x".to_owned());
        record.begin_attempt(0).unwrap();
        // A crash here leaves the attempt counted as failed.
        assert_eq!(record.failed_in_row, 1);
        record.finish_attempt(true, 0).unwrap();
        assert_eq!(record.failed_in_row, 0);
    }

    #[test]
    fn reset_pin_must_be_set_again() {
        let mut record = PinRecord::new("$argon2id$x".to_owned());
        record.hash = None;
        assert_eq!(record.begin_attempt(0), Err(PinError::NotSet));
        assert!(!format!("{record:?}").contains("argon2"));
    }

    #[test]
    fn lock_message_says_how_long() {
        let err = PinError::Locked {
            remaining_ms: 90_000,
        };
        assert!(err.to_string().ends_with("try again in 90 seconds"));
        assert_eq!(human_duration(3 * 3600 * 1000), "3 hours");
        assert_eq!(human_duration(5 * 60 * 1000), "5 minutes");
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    const PEPPER: &[u8] = b"pepper-very-secret-0123456789abcdef-0123456789";

    #[test]
    fn debug_hides_the_pepper_and_the_hash() {
        let pepper = Pepper::new(PEPPER.to_vec()).expect("32 bytes or more");
        let hasher = PinHasher::new(pepper.clone());
        let record = PinRecord::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaC1zZWNyZXQ".into());
        let debug = format!("{pepper:?} {hasher:?} {hasher:#?} {record:?} {record:#?}");
        assert!(!debug.contains("very-secret"), "{debug}");
        assert!(!debug.contains("argon2id"), "{debug}");
        let pin = Pin::parse("4821").unwrap();
        assert!(!format!("{pin:?} {pin:#?}").contains("4821"));
    }
}
