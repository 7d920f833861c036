//! Which payment each of the bot's completed-payment receipts is about, so a `!refund`
//! replying to a receipt finds the transfer it refunds.
//!
//! Trees: `receipteventid_transferid` (the receipt's event id -> the transfer id, 16 bytes
//! big-endian) and `seq_receipteventid` (insertion order, to drop the oldest links beyond
//! [`RECEIPT_LINKS_MAX`]).

use std::sync::Arc;

use ruma::EventId;

use super::StoreError;

const RECEIPTEVENTID_TRANSFERID: &str = "receipteventid_transferid";
const SEQ_RECEIPTEVENTID: &str = "seq_receipteventid";

/// Most receipt links kept. A payment has up to four receipt events (typed receipt and notice,
/// in the room and in the payer's DM); beyond this the oldest links are dropped, and a
/// `!refund` replying to such an old receipt is answered as a reply to no payment.
pub const RECEIPT_LINKS_MAX: u64 = 2_000_000;

/// The receipt links, in the payment database (their trees share its flushes).
#[derive(Clone)]
pub struct ReceiptStore {
    db: sled::Db,
    log: Arc<std::fs::File>,
    links: sled::Tree,
    order: sled::Tree,
    /// Serialises links so the count bound holds under concurrent receipts.
    lock: Arc<parking_lot::Mutex<()>>,
}

impl ReceiptStore {
    /// The receipt trees of `db`.
    pub fn in_db(db: sled::Db, log: Arc<std::fs::File>) -> Result<Self, StoreError> {
        Ok(Self {
            links: db.open_tree(RECEIPTEVENTID_TRANSFERID)?,
            order: db.open_tree(SEQ_RECEIPTEVENTID)?,
            lock: Default::default(),
            log,
            db,
        })
    }

    /// Records that the bot's events `receipts` tell of transfer `transfer_id` (a receipt
    /// linked before keeps its link), then flushes once. Drops the oldest links beyond
    /// `links_max`.
    pub async fn link(
        &self,
        receipts: &[&EventId],
        transfer_id: u128,
        links_max: u64,
    ) -> Result<(), StoreError> {
        {
            let _held = self.lock.lock();
            for receipt in receipts {
                self.link_one(receipt, transfer_id, links_max)?;
            }
        }
        let (db, log) = (self.db.clone(), self.log.clone());
        tokio::task::spawn_blocking(move || crate::sled_open::flush_durably(&db, &log)).await??;
        Ok(())
    }

    fn link_one(
        &self,
        receipt: &EventId,
        transfer_id: u128,
        links_max: u64,
    ) -> Result<(), StoreError> {
        if self.links.get(receipt.as_str().as_bytes())?.is_some() {
            return Ok(());
        }
        let seq = self.db.generate_id()?;
        self.links
            .insert(receipt.as_str().as_bytes(), &transfer_id.to_be_bytes())?;
        self.order
            .insert(seq.to_be_bytes(), receipt.as_str().as_bytes())?;
        // Ids are increasing, not dense (sled skips ahead after a restart): gaps only make it
        // keep fewer. Bounded: at most a few of the oldest go per link.
        let Some(newest_dropped) = seq.checked_sub(links_max) else {
            return Ok(());
        };
        for _ in 0..4 {
            let Some((key, event)) = self.order.first()? else {
                break;
            };
            let at =
                u64::from_be_bytes(key.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    tree: SEQ_RECEIPTEVENTID,
                    reason: "key is not a sequence number",
                })?);
            if at > newest_dropped {
                break;
            }
            self.links.remove(event)?;
            self.order.remove(key)?;
        }
        Ok(())
    }

    /// The transfer the bot's event `receipt` tells of, if it is a receipt the bot keeps.
    pub fn transfer_of(&self, receipt: &EventId) -> Result<Option<u128>, StoreError> {
        match self.links.get(receipt.as_str().as_bytes())? {
            None => Ok(None),
            Some(bytes) => bytes
                .as_ref()
                .try_into()
                .map(|raw| Some(u128::from_be_bytes(raw)))
                .map_err(|_| StoreError::Corrupt {
                    tree: RECEIPTEVENTID_TRANSFERID,
                    reason: "value is not a transfer id",
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::event_id;

    use super::*;

    fn open(dir: &std::path::Path) -> ReceiptStore {
        let db = sled::Config::new().path(dir).open().unwrap();
        let log = Arc::new(crate::sled_open::log_file(dir).unwrap());
        ReceiptStore::in_db(db, log).unwrap()
    }

    #[tokio::test]
    async fn links_are_found_kept_once_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.link(&[event_id!("$a")], 7, 100).await.unwrap();
        store.link(&[event_id!("$a")], 8, 100).await.unwrap();
        assert_eq!(store.transfer_of(event_id!("$a")).unwrap(), Some(7));
        assert_eq!(store.transfer_of(event_id!("$b")).unwrap(), None);
        // With room for two, the oldest goes.
        store
            .link(&[event_id!("$b"), event_id!("$c")], 9, 2)
            .await
            .unwrap();
        assert_eq!(store.transfer_of(event_id!("$a")).unwrap(), None);
        assert_eq!(store.transfer_of(event_id!("$c")).unwrap(), Some(9));
    }
}
