//! The balances as of the last durable batch, for reads that must not queue behind the
//! writer: `balances` and `account` answer from here at once, while a batch is being decided
//! or made durable. The writer copies the accounts a batch touched into it after the batch's
//! append returned (so nothing here can be taken back by a crash) and before it answers the
//! batch's callers (so a caller reads its own effect).
//!
//! It holds one [`AccountView`] per account (O(accounts), not history); a batch costs a copy
//! of the balances of the accounts it touched, without allocation except for new accounts.

use crate::ledger::state::HashMap;

use super::amount::CurrencyCode;
use super::model::{AccountId, AccountView, Balances, FreezeMode, Owner};

/// Index of an account, the same as the writer's state uses (assigned in journal order).
pub(crate) type ViewIdx = u32;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct BalanceView {
    /// By account index.
    accounts: Vec<AccountView>,
    index: HashMap<AccountId, ViewIdx>,
    /// The ledger's currencies in the order `balances` lists them.
    currencies: Vec<CurrencyCode>,
}

impl BalanceView {
    /// One account; `None` if never used.
    pub fn account(&self, id: &AccountId) -> Option<AccountView> {
        self.index
            .get(id)
            .map(|&idx| self.accounts[idx as usize].clone())
    }

    /// The accounts of `owner`, in currency order (as the writer's state lists them).
    pub fn balances(&self, owner: &Owner) -> Vec<AccountView> {
        self.currencies
            .iter()
            .filter_map(|&currency| {
                self.account(&AccountId {
                    owner: owner.clone(),
                    currency,
                })
            })
            .collect()
    }

    /// Every account, in index order.
    pub fn all(&self) -> &[AccountView] {
        &self.accounts
    }

    /// How many accounts it holds (new ones are appended in index order).
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// Sets the currency order (it changes only when a currency is defined, at open).
    pub fn set_currencies(&mut self, currencies: Vec<CurrencyCode>) {
        if self.currencies != currencies {
            self.currencies = currencies;
        }
    }

    /// Appends the next account (its index is [`BalanceView::len`]).
    pub fn push(&mut self, view: AccountView) {
        let idx = ViewIdx::try_from(self.accounts.len()).expect("account indexes fit in u32");
        self.index.insert(view.id.clone(), idx);
        self.accounts.push(view);
    }

    /// Replaces the balances and freeze of account `idx`.
    /// (Two accounts per transfer pass here: no copy of the id, which owns a string.)
    pub fn update(
        &mut self,
        idx: ViewIdx,
        id: &AccountId,
        balances: Balances,
        frozen: Option<FreezeMode>,
    ) {
        let slot = &mut self.accounts[idx as usize];
        debug_assert_eq!(&slot.id, id);
        slot.balances = balances;
        slot.frozen = frozen;
    }
}
