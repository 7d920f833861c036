//! The journal's byte format: one record per committed batch, chained by blake3.
//!
//! Record (all integers little-endian; `v` = LEB128 varint):
//! ```text
//! version u8 = 1 | seq u64 | prev_hash [32] | time_ms u64 | count v | events... | hash [32]
//! ```
//! `hash = blake3(everything before it)`, and `prev_hash` is the previous record's `hash`
//! (all zeros for seq 1). The head (`seq u64 | hash [32]`) is written with each record, so a
//! dropped tail is noticed too.

use super::amount::CurrencyCode;
use super::model::{AccountId, FreezeMode, Owner, TransferError, TransferId, TransferKind};
use super::state::{Body, Event};

/// Format version of a record.
const RECORD_VERSION: u8 = 1;
/// Bytes of a blake3 hash.
pub(crate) const HASH_LEN: usize = 32;
/// Size of the fixed record header: version, seq, prev_hash, time_ms.
const HEADER_LEN: usize = 1 + 8 + HASH_LEN + 8;

/// A decoded journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub seq: u64,
    pub prev_hash: [u8; HASH_LEN],
    pub time_ms: u64,
    pub events: Vec<Event>,
    pub hash: [u8; HASH_LEN],
}

/// The last record's seq and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub seq: u64,
    pub hash: [u8; HASH_LEN],
}

impl Head {
    pub fn encode(&self) -> [u8; 8 + HASH_LEN] {
        let mut out = [0u8; 8 + HASH_LEN];
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..].copy_from_slice(&self.hash);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != 8 + HASH_LEN {
            return Err(format!(
                "head has {} bytes, expected {}",
                bytes.len(),
                8 + HASH_LEN
            ));
        }
        let mut hash = [0u8; HASH_LEN];
        hash.copy_from_slice(&bytes[8..]);
        Ok(Self {
            seq: u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
            hash,
        })
    }
}

/// The most journal bytes one command can add: a recorded failure carries both accounts
/// (owner names up to 512 bytes) and a memo up to 1,024 bytes, and may open two accounts.
pub(crate) const COMMAND_BYTES_MAX: usize = 4 * 1024;

/// Builds one record as events are decided, so the writer knows its size as it goes.
#[derive(Debug, Default)]
pub(crate) struct RecordBuilder {
    entries: Vec<u8>,
    count: u64,
}

impl RecordBuilder {
    /// Appends one event.
    pub fn push(&mut self, event: &Event) {
        encode_event(&mut self.entries, event);
        self.count += 1;
    }

    /// Bytes of the entries so far.
    pub fn bytes(&self) -> usize {
        self.entries.len()
    }

    /// Events pushed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no event was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Forgets the events, keeping the allocation.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.count = 0;
    }

    /// The record's bytes and hash.
    pub fn finish(
        &self,
        seq: u64,
        prev_hash: &[u8; HASH_LEN],
        time_ms: u64,
    ) -> (Vec<u8>, [u8; HASH_LEN]) {
        let mut out = Vec::with_capacity(HEADER_LEN + 10 + self.entries.len() + HASH_LEN);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(prev_hash);
        out.extend_from_slice(&time_ms.to_le_bytes());
        put_varint(&mut out, u128::from(self.count));
        out.extend_from_slice(&self.entries);
        let hash = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&hash);
        (out, hash)
    }
}

/// Encodes a record of `events` and returns its bytes and hash.
pub(crate) fn encode_record(
    seq: u64,
    prev_hash: &[u8; HASH_LEN],
    time_ms: u64,
    events: &[Event],
) -> (Vec<u8>, [u8; HASH_LEN]) {
    let mut builder = RecordBuilder::default();
    for event in events {
        builder.push(event);
    }
    builder.finish(seq, prev_hash, time_ms)
}

/// Decodes a record, checking its own hash. Chain checks (seq, prev_hash) are the caller's.
pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record, String> {
    if bytes.len() < HEADER_LEN + 1 + HASH_LEN {
        return Err(format!("record is too short ({} bytes)", bytes.len()));
    }
    let (body, stored_hash) = bytes.split_at(bytes.len() - HASH_LEN);
    if blake3::hash(body).as_bytes() != stored_hash {
        return Err("record hash does not match its content (altered bytes)".to_owned());
    }
    let mut r = Reader {
        bytes: body,
        pos: 0,
    };
    let version = r.u8()?;
    if version != RECORD_VERSION {
        return Err(format!("unknown record version {version}"));
    }
    let seq = r.u64_fixed()?;
    let prev_hash = r.array::<HASH_LEN>()?;
    let time_ms = r.u64_fixed()?;
    let count = r.varint()?;
    let mut events = Vec::with_capacity(count.min(1 << 16) as usize);
    for i in 0..count {
        events.push(decode_event(&mut r).map_err(|e| format!("entry {i}: {e}"))?);
    }
    if r.pos != body.len() {
        return Err("trailing bytes after the last entry".to_owned());
    }
    let mut hash = [0u8; HASH_LEN];
    hash.copy_from_slice(stored_hash);
    Ok(Record {
        seq,
        prev_hash,
        time_ms,
        events,
        hash,
    })
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u128);
    out.extend_from_slice(bytes);
}

pub(crate) fn put_account(out: &mut Vec<u8>, account: &AccountId) {
    match &account.owner {
        Owner::User(name) => {
            out.push(0);
            put_bytes(out, name.as_bytes());
        }
        Owner::Issuer => out.push(1),
        Owner::Settlement => out.push(2),
        Owner::Fees => out.push(3),
        // Tag 4 is new; tags 0-3 keep their bytes, so older records decode unchanged.
        Owner::Merchant(id) => {
            out.push(4);
            put_bytes(out, id.as_bytes());
        }
    }
    out.extend_from_slice(&account.currency.bytes());
}

pub(crate) fn put_kind(out: &mut Vec<u8>, kind: &TransferKind) {
    match kind {
        TransferKind::Single => out.push(0),
        TransferKind::Pending { timeout_ms } => {
            out.push(1);
            put_varint(out, u128::from(*timeout_ms));
        }
        TransferKind::Refund { original } => {
            out.push(2);
            out.extend_from_slice(&original.0.to_le_bytes());
        }
    }
}

/// A kind with the original of a pending refund: tag 3 (pending + original) when linked.
pub(crate) fn put_kind_linked(
    out: &mut Vec<u8>,
    kind: &TransferKind,
    refund_of: Option<TransferId>,
) {
    match (kind, refund_of) {
        (TransferKind::Pending { timeout_ms }, Some(original)) => {
            out.push(3);
            put_varint(out, u128::from(*timeout_ms));
            out.extend_from_slice(&original.0.to_le_bytes());
        }
        _ => put_kind(out, kind),
    }
}

pub(crate) fn put_freeze(out: &mut Vec<u8>, mode: Option<FreezeMode>) {
    out.push(match mode {
        None => 0,
        Some(FreezeMode::Debits) => 1,
        Some(FreezeMode::All) => 2,
    });
}

/// `TransferCreated` of a transfer with a reference (issue 15): tag 2's fields, then the
/// reference (u128 LE, never 0).
const TAG_CREATED_WITH_REFERENCE: u8 = 9;

fn encode_event(out: &mut Vec<u8>, event: &Event) {
    match event {
        Event::AccountOpened { account } => {
            out.push(1);
            put_account(out, account);
        }
        Event::TransferCreated {
            id,
            kind,
            debit,
            credit,
            amount_minor,
            memo,
            refund_of,
            reference,
        } => {
            // Tag 9 is tag 2 followed by the reference: a transfer without one is written
            // as before the references existed, byte for byte, and old journals replay.
            out.push(if *reference == 0 {
                2
            } else {
                TAG_CREATED_WITH_REFERENCE
            });
            out.extend_from_slice(&id.0.to_le_bytes());
            put_kind_linked(out, kind, *refund_of);
            put_varint(out, u128::from(*debit));
            put_varint(out, u128::from(*credit));
            put_varint(out, *amount_minor);
            put_bytes(out, memo);
            if *reference != 0 {
                out.extend_from_slice(&reference.to_le_bytes());
            }
        }
        Event::PendingPosted { id, amount_minor } => {
            out.push(3);
            out.extend_from_slice(&id.0.to_le_bytes());
            put_varint(out, *amount_minor);
        }
        Event::PendingVoided { id } => {
            out.push(4);
            out.extend_from_slice(&id.0.to_le_bytes());
        }
        Event::PendingExpired { id } => {
            out.push(5);
            out.extend_from_slice(&id.0.to_le_bytes());
        }
        Event::TransferFailed { id, body, error } => {
            out.push(6);
            out.extend_from_slice(&id.0.to_le_bytes());
            put_varint(out, u128::from(error.code()));
            put_kind_linked(out, &body.kind, body.refund_of);
            for account in [&body.debit, &body.credit] {
                match account {
                    None => out.push(0),
                    Some(a) => {
                        out.push(1);
                        put_account(out, a);
                    }
                }
            }
            out.extend_from_slice(&body.currency.bytes());
            put_varint(out, body.amount_minor);
            put_bytes(out, &body.memo);
        }
        Event::CurrencyDefined { code, exponent } => {
            out.push(8);
            out.extend_from_slice(&code.bytes());
            put_varint(out, u128::from(*exponent));
        }
        Event::AccountFrozen { account, mode } => {
            out.push(7);
            put_varint(out, u128::from(*account));
            put_freeze(out, *mode);
        }
    }
}

pub(crate) struct Reader<'a> {
    pub bytes: &'a [u8],
    pub pos: usize,
}

impl Reader<'_> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    pub(crate) fn u64_fixed(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn id(&mut self) -> Result<TransferId, String> {
        Ok(TransferId(u128::from_le_bytes(self.array()?)))
    }

    pub(crate) fn varint(&mut self) -> Result<u128, String> {
        let mut v: u128 = 0;
        for shift in (0..128).step_by(7) {
            let byte = self.u8()?;
            v |= u128::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".to_owned())
    }

    pub(crate) fn varint_u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.varint()?).map_err(|_| "index out of range".to_owned())
    }

    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
        Ok(self.take(len)?.to_vec())
    }

    pub(crate) fn currency(&mut self) -> Result<CurrencyCode, String> {
        let bytes = self.array::<3>()?;
        CurrencyCode::from_bytes(bytes).ok_or_else(|| "invalid currency code".to_owned())
    }

    pub(crate) fn account(&mut self) -> Result<AccountId, String> {
        let owner = match self.u8()? {
            0 => Owner::User(
                String::from_utf8(self.bytes()?).map_err(|_| "owner is not UTF-8".to_owned())?,
            ),
            1 => Owner::Issuer,
            2 => Owner::Settlement,
            3 => Owner::Fees,
            4 => Owner::Merchant(
                String::from_utf8(self.bytes()?).map_err(|_| "owner is not UTF-8".to_owned())?,
            ),
            tag => return Err(format!("unknown owner tag {tag}")),
        };
        Ok(AccountId {
            owner,
            currency: self.currency()?,
        })
    }

    pub(crate) fn kind(&mut self) -> Result<TransferKind, String> {
        match self.kind_linked()? {
            (kind, None) => Ok(kind),
            (_, Some(_)) => Err("a pending refund where none may be".to_owned()),
        }
    }

    /// A kind written by `put_kind_linked`: with the original of a pending refund.
    pub(crate) fn kind_linked(&mut self) -> Result<(TransferKind, Option<TransferId>), String> {
        let timeout = |r: &mut Self| -> Result<u64, String> {
            u64::try_from(r.varint()?).map_err(|_| "timeout out of range".to_owned())
        };
        match self.u8()? {
            0 => Ok((TransferKind::Single, None)),
            1 => Ok((
                TransferKind::Pending {
                    timeout_ms: timeout(self)?,
                },
                None,
            )),
            2 => Ok((
                TransferKind::Refund {
                    original: self.id()?,
                },
                None,
            )),
            3 => Ok((
                TransferKind::Pending {
                    timeout_ms: timeout(self)?,
                },
                Some(self.id()?),
            )),
            tag => Err(format!("unknown transfer kind {tag}")),
        }
    }

    pub(crate) fn freeze(&mut self) -> Result<Option<FreezeMode>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(FreezeMode::Debits)),
            2 => Ok(Some(FreezeMode::All)),
            tag => Err(format!("unknown freeze mode {tag}")),
        }
    }
}

fn decode_event(r: &mut Reader<'_>) -> Result<Event, String> {
    Ok(match r.u8()? {
        1 => Event::AccountOpened {
            account: r.account()?,
        },
        tag @ (2 | TAG_CREATED_WITH_REFERENCE) => {
            let id = r.id()?;
            let (kind, refund_of) = r.kind_linked()?;
            let (debit, credit) = (r.varint_u32()?, r.varint_u32()?);
            let (amount_minor, memo) = (r.varint()?, r.bytes()?);
            let reference = match tag {
                2 => 0,
                _ => match u128::from_le_bytes(r.array()?) {
                    0 => return Err("a reference of 0 written as a reference".to_owned()),
                    reference => reference,
                },
            };
            Event::TransferCreated {
                id,
                kind,
                debit,
                credit,
                amount_minor,
                memo,
                refund_of,
                reference,
            }
        }
        3 => Event::PendingPosted {
            id: r.id()?,
            amount_minor: r.varint()?,
        },
        4 => Event::PendingVoided { id: r.id()? },
        5 => Event::PendingExpired { id: r.id()? },
        6 => {
            let id = r.id()?;
            let code = u16::try_from(r.varint()?).map_err(|_| "error code out of range")?;
            let error = TransferError::from_code(code)
                .ok_or_else(|| format!("unknown error code {code}"))?;
            let (kind, refund_of) = r.kind_linked()?;
            let mut accounts = [None, None];
            for slot in &mut accounts {
                *slot = match r.u8()? {
                    0 => None,
                    1 => Some(r.account()?),
                    tag => return Err(format!("unknown option tag {tag}")),
                };
            }
            let [debit, credit] = accounts;
            Event::TransferFailed {
                id,
                error,
                body: Body {
                    kind,
                    debit,
                    credit,
                    currency: r.currency()?,
                    amount_minor: r.varint()?,
                    memo: r.bytes()?,
                    refund_of,
                    reference: 0,
                },
            }
        }
        7 => Event::AccountFrozen {
            account: r.varint_u32()?,
            mode: r.freeze()?,
        },
        8 => Event::CurrencyDefined {
            code: r.currency()?,
            exponent: r.varint_u32()?,
        },
        tag => return Err(format!("unknown entry tag {tag}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_events() -> Vec<Event> {
        let eur = CurrencyCode::new("EUR").unwrap();
        vec![
            Event::CurrencyDefined {
                code: eur,
                exponent: 2,
            },
            Event::AccountOpened {
                account: AccountId {
                    owner: Owner::user("@alice:example.org"),
                    currency: eur,
                },
            },
            Event::AccountOpened {
                account: AccountId {
                    owner: Owner::Issuer,
                    currency: eur,
                },
            },
            Event::TransferCreated {
                id: TransferId(u128::MAX - 7),
                kind: TransferKind::Pending { timeout_ms: 60_000 },
                debit: 1,
                credit: 0,
                amount_minor: 1250,
                memo: b"room".to_vec(),
                refund_of: None,
                reference: 0,
            },
            Event::PendingPosted {
                id: TransferId(3),
                amount_minor: u128::MAX,
            },
            Event::PendingVoided { id: TransferId(4) },
            Event::PendingExpired { id: TransferId(5) },
            Event::TransferFailed {
                id: TransferId(6),
                error: TransferError::InsufficientFunds,
                body: Body {
                    kind: TransferKind::Refund {
                        original: TransferId(9),
                    },
                    debit: None,
                    credit: Some(AccountId {
                        owner: Owner::Fees,
                        currency: eur,
                    }),
                    currency: eur,
                    amount_minor: 1,
                    memo: vec![],
                    refund_of: None,
                    reference: 0,
                },
            },
            Event::AccountFrozen {
                account: 300,
                mode: Some(FreezeMode::All),
            },
        ]
    }

    #[test]
    fn records_round_trip() {
        let events = sample_events();
        let (bytes, hash) = encode_record(7, &[9u8; HASH_LEN], 1_700_000_000_000, &events);
        let record = decode_record(&bytes).unwrap();
        assert_eq!(record.seq, 7);
        assert_eq!(record.prev_hash, [9u8; HASH_LEN]);
        assert_eq!(record.time_ms, 1_700_000_000_000);
        assert_eq!(record.events, events);
        assert_eq!(record.hash, hash);
    }

    /// Issue 15 (history by reference): a transfer's reference is journaled under tag 9 (tag
    /// 2's fields, then the reference); one without a reference is written under tag 2 as
    /// before, so a record written before references existed (the golden record) still
    /// decodes, each transfer with no reference, and so do the journals of older ledgers.
    #[test]
    fn a_reference_is_journaled_and_records_from_before_references_still_read() {
        let old = decode_record(&hex::decode(GOLDEN_RECORD_HEX).unwrap()).unwrap();
        assert_eq!(old.events, sample_events());
        assert!(old
            .events
            .iter()
            .any(|e| matches!(e, Event::TransferCreated { reference: 0, .. })));

        let with = |reference: u128| Event::TransferCreated {
            id: TransferId(5),
            kind: TransferKind::Pending { timeout_ms: 60_000 },
            debit: 1,
            credit: 0,
            amount_minor: 1250,
            memo: b"room".to_vec(),
            refund_of: Some(TransferId(4)),
            reference,
        };
        let (mut plain, mut referenced) = (Vec::new(), Vec::new());
        encode_event(&mut plain, &with(0));
        encode_event(&mut referenced, &with(u128::MAX - 1));
        assert_eq!((plain[0], referenced[0]), (2, TAG_CREATED_WITH_REFERENCE));
        assert_eq!(referenced[1..referenced.len() - 16], plain[1..]);
        let (bytes, _) = encode_record(1, &[0u8; HASH_LEN], 5, &[with(7), with(0)]);
        assert_eq!(decode_record(&bytes).unwrap().events, [with(7), with(0)]);
        // A reference of 0 under tag 9 is not what the encoder writes: refused.
        let mut zero = referenced.clone();
        let at = zero.len() - 16;
        zero[at..].fill(0);
        let mut r = Reader {
            bytes: &zero,
            pos: 0,
        };
        assert!(decode_event(&mut r).is_err());
    }

    /// The stored format, byte for byte: a change here is a format change (bump
    /// `RECORD_VERSION` and keep reading the old one).
    #[test]
    fn record_format_is_stable() {
        let (bytes, _) = encode_record(1, &[0u8; HASH_LEN], 1_000, &sample_events());
        assert_eq!(hex::encode(&bytes), GOLDEN_RECORD_HEX);
    }

    const GOLDEN_RECORD_HEX: &str = concat!(
        "01010000000000000000000000000000000000000000000000000000000000000000000000000000",
        "00e80300000000000009084555520201001240616c6963653a6578616d706c652e6f726745555201",
        "0145555202f8ffffffffffffffffffffffffffffff01e0d4030100e20904726f6f6d030300000000",
        "0000000000000000000000ffffffffffffffffffffffffffffffffffff0304040000000000000000",
        "00000000000000050500000000000000000000000000000006060000000000000000000000000000",
        "003f0209000000000000000000000000000000000103455552455552010007ac020220da44566033",
        "5a4ab9e04ae51d487848e2d7f9359a4f0bffe53cd0e9b4e211fa"
    );

    #[test]
    fn every_flipped_byte_is_detected() {
        let (bytes, _) = encode_record(1, &[0u8; HASH_LEN], 5, &sample_events());
        for i in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[i] ^= 0x01;
            assert!(
                decode_record(&altered).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert!(decode_record(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn the_largest_command_fits_its_bound() {
        let eur = CurrencyCode::new("EUR").unwrap();
        let account = |c: char| AccountId {
            owner: Owner::user(c.to_string().repeat(crate::ledger::OWNER_BYTES_MAX)),
            currency: eur,
        };
        let events = [
            Event::AccountOpened {
                account: account('a'),
            },
            Event::AccountOpened {
                account: account('b'),
            },
            Event::TransferFailed {
                id: TransferId(u128::MAX),
                error: TransferError::InsufficientFunds,
                body: Body {
                    kind: TransferKind::Refund {
                        original: TransferId(u128::MAX),
                    },
                    debit: Some(account('a')),
                    credit: Some(account('b')),
                    currency: eur,
                    amount_minor: u128::MAX,
                    memo: vec![0; crate::ledger::MEMO_BYTES_MAX],
                    refund_of: None,
                    reference: 0,
                },
            },
        ];
        let mut builder = RecordBuilder::default();
        for event in &events {
            builder.push(event);
        }
        assert!(builder.bytes() <= COMMAND_BYTES_MAX, "{}", builder.bytes());
    }

    #[test]
    fn head_round_trips() {
        let head = Head {
            seq: 42,
            hash: [7u8; HASH_LEN],
        };
        assert_eq!(Head::decode(&head.encode()).unwrap(), head);
        assert!(Head::decode(&[0u8; 3]).is_err());
    }
}

#[cfg(test)]
mod merchant_tests {
    use super::*;

    #[test]
    fn merchant_accounts_round_trip_under_their_own_tag() {
        let eur = CurrencyCode::new("EUR").unwrap();
        let account = AccountId {
            owner: Owner::merchant("cafe"),
            currency: eur,
        };
        let mut out = Vec::new();
        put_account(&mut out, &account);
        // Tag 4, then the id as length-prefixed bytes, then the currency.
        assert_eq!(out, [&[4u8, 4][..], b"cafe", b"EUR"].concat());
        let events = vec![Event::AccountOpened { account }];
        let (bytes, _) = encode_record(1, &[0u8; HASH_LEN], 1_000, &events);
        assert_eq!(decode_record(&bytes).unwrap().events, events);
        // A user named like the merchant is another account.
        let mut user = Vec::new();
        put_account(
            &mut user,
            &AccountId {
                owner: Owner::user("cafe"),
                currency: eur,
            },
        );
        assert_ne!(user, out);
    }
}
