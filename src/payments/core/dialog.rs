//! PIN dialogs (docs/payments.md, "Choose a PIN" and "When your security keys change"):
//! choosing a PIN (twice), changing it (the old one first), and accepting changed security
//! keys with the PIN. Each step is recorded with its answer, so a retried message gets the same
//! answer; the argon2id work a step needs comes back as [`Work`].

use super::after_pin::pin_error_sentence;
use super::decision::{Decision, EventRef, Record};
use crate::policy::pin::PinError;
use crate::store::payments::Dialog;

/// What answering the dialog with a PIN needs first.
#[derive(Debug, PartialEq)]
pub enum Need {
    /// Nothing more: this is the answer.
    Decided(Decision),
    /// The argon2id hash of the new PIN.
    Hash,
    /// Whether the PIN matches this hash (the first answer of a new PIN).
    Match(String),
    /// The PIN checked against the user's PIN (counting an attempt).
    CheckPin,
}

/// The result of the work a [`Need`] asked for.
#[derive(Debug)]
pub enum Work {
    /// The new PIN's hash.
    Hashed(String),
    /// Whether it matched the first answer.
    Matched(bool),
    /// The check against the user's PIN.
    Checked(Result<(), PinError>),
}

/// What the dialog's facts say about the PIN event.
#[derive(Debug)]
pub struct DialogFacts {
    /// The new PIN is not on the blocklist (`Err`: why it is too easy).
    pub choosable: Result<(), PinError>,
    /// The PIN comes from a session of the changed identity (the only one that may accept it).
    pub from_changed_identity: bool,
    /// The user's PIN was seen where others could read it.
    pub pin_exposed: bool,
}

/// Moves the dialog on (or ends it) and answers, in one recorded step.
fn step(event: &EventRef, next: Option<Dialog>, reply: &str) -> Decision {
    Decision {
        record: vec![Record::DialogStep {
            user: event.sender.clone(),
            next,
            event_id: event.event_id.clone(),
            reply: reply.to_owned(),
        }],
        ..Decision::none()
    }
    .then_send(event.reply(reply, "pin-dialog"))
    .finish(event)
}

/// What a PIN answering `dialog` needs, or the answer when nothing more is needed.
pub fn need(
    event: &EventRef,
    dialog: &Dialog,
    facts: DialogFacts,
    now_ms: u64,
    timeout_ms: u64,
) -> Need {
    let expires_at_ms = now_ms + timeout_ms;
    match dialog {
        Dialog::NewPin { change, .. } => match &facts.choosable {
            // The dialog stays open for another PIN.
            Err(too_easy) => Need::Decided(step(
                event,
                Some(Dialog::NewPin {
                    expires_at_ms,
                    change: *change,
                }),
                &pin_error_sentence(too_easy),
            )),
            Ok(()) => Need::Hash,
        },
        Dialog::ConfirmPin { hash, .. } => Need::Match(hash.clone()),
        Dialog::AcceptIdentity { .. } if !facts.from_changed_identity => {
            // Not sent from a session of the changed identity: either the keys were accepted
            // meanwhile (this very message, handled again after a crash), or it comes from a
            // session the new keys did not sign. Neither may accept keys, and the PIN is not
            // used for anything else.
            Need::Decided(step(
                event,
                None,
                "I did not use this PIN: no change of your security keys is waiting for it \
                 from this session. If a payment is waiting for your PIN, send it again.",
            ))
        }
        Dialog::AcceptIdentity { .. } if facts.pin_exposed => Need::Decided(step(
            event,
            None,
            "Your PIN was exposed, so it cannot confirm new security keys. Ask the operator to \
             reset your PIN and confirm your new keys.",
        )),
        Dialog::AcceptIdentity { .. } | Dialog::OldPin { .. } => Need::CheckPin,
    }
}

/// The answer once the work [`need`] asked for is done.
pub fn after(
    event: &EventRef,
    dialog: &Dialog,
    work: Work,
    now_ms: u64,
    timeout_ms: u64,
) -> Decision {
    let expires_at_ms = now_ms + timeout_ms;
    match (dialog, work) {
        (Dialog::NewPin { change, .. }, Work::Hashed(hash)) => {
            let next = Dialog::ConfirmPin {
                expires_at_ms,
                hash,
                change: *change,
            };
            let prompt = prompt(&next);
            step(event, Some(next), prompt)
        }
        (Dialog::ConfirmPin { hash, change, .. }, Work::Matched(true)) => {
            let text = if *change {
                "✅ Your PIN is changed."
            } else {
                "✅ Your PIN is set. You can now pay with !pay in encrypted rooms."
            };
            // The PIN first: a crash between the two leaves the dialog open, and the retried
            // message sets the same hash again.
            let mut decision = step(event, None, text);
            decision.record.insert(
                0,
                Record::NewPin {
                    user: event.sender.clone(),
                    hash: hash.clone(),
                },
            );
            decision
        }
        (Dialog::ConfirmPin { change, .. }, Work::Matched(false)) => step(
            event,
            Some(Dialog::NewPin {
                expires_at_ms,
                change: *change,
            }),
            "The two PINs differ. Send a new 4-digit PIN.",
        ),
        (Dialog::AcceptIdentity { .. }, Work::Checked(Ok(()))) => {
            let mut decision = step(
                event,
                None,
                "✅ I accept your new security keys. You can pay again; if a payment is \
                 waiting for your PIN, send your PIN once more to confirm it.",
            );
            decision.record.insert(
                0,
                Record::AcceptIdentity {
                    user: event.sender.clone(),
                },
            );
            decision
        }
        (Dialog::OldPin { .. }, Work::Checked(Ok(()))) => {
            let next = Dialog::NewPin {
                expires_at_ms,
                change: true,
            };
            step(event, Some(next.clone()), prompt(&next))
        }
        (_, Work::Checked(Err(error))) => {
            // A locked (or reset) PIN ends the dialog; a wrong one leaves it open for another
            // try (the attempt itself was recorded by the check).
            let sentence = pin_error_sentence(&error);
            if matches!(error, PinError::Locked { .. } | PinError::NotSet) {
                step(event, None, &sentence)
            } else {
                Decision::say(event.reply(sentence, "pin-dialog")).finish(event)
            }
        }
        (dialog, work) => unreachable!("{work:?} was never asked for by {dialog:?}"),
    }
}

/// What the bot says to open or move on a dialog.
pub fn prompt(dialog: &Dialog) -> &'static str {
    match dialog {
        Dialog::NewPin { change: false, .. } => {
            "Choose a 4-digit PIN and send it here (only here: this chat is private and \
             encrypted). I delete each PIN message after reading it."
        }
        Dialog::NewPin { change: true, .. } => "Now send your new 4-digit PIN.",
        Dialog::ConfirmPin { .. } => "Send the same PIN again to confirm it.",
        Dialog::OldPin { .. } => "To change your PIN, first send your current PIN.",
        Dialog::AcceptIdentity { .. } => {
            "🔐 Your account's security keys changed (someone reset your cross-signing). If it \
             was you, send your PIN here to confirm; until then I take no payments from you. If \
             it was not you, do not send your PIN: someone else may control your account. Tell \
             the operator."
        }
    }
}

/// `!pin set` / `!pin change` before the DM is known: what the sender's trust allows.
#[derive(Debug, PartialEq)]
pub enum PinCommand {
    /// Refused: this is the answer.
    Refused(Decision),
    /// Go on (after applying this decision, e.g. accepting changed keys).
    Go(Decision),
}

/// What the trust check of a `!pin` command needs to know.
#[derive(Debug)]
pub struct PinCommandFacts<'a> {
    /// `!pin change` (else `!pin set`).
    pub change: bool,
    /// The sender has a PIN.
    pub has_pin: bool,
    /// The trust check of the command.
    pub trust: &'a Result<(), crate::policy::trust::TrustRefusal>,
    /// A changed identity may be accepted without a PIN (asked only when it matters: the
    /// operator said so, or a user who never had a PIN nor a payment).
    pub may_accept_keys_without_pin: bool,
    /// The sender's ready DM, if any.
    pub ready_dm: Option<&'a ruma::OwnedRoomId>,
}

/// The trust step of a `!pin` command. `ask_to_accept_identity` is the decision that opens the
/// dialog accepting a changed identity (see [`super::pin_answer::ask_to_accept_identity`]).
pub fn pin_command(
    event: &EventRef,
    facts: PinCommandFacts<'_>,
    ask_to_accept_identity: impl FnOnce() -> Decision,
) -> PinCommand {
    use crate::policy::trust::TrustRefusal;
    match facts.trust {
        Ok(()) => PinCommand::Go(Decision::none()),
        // `!pin change` without a PIN only gets told to use `!pin set`.
        Err(TrustRefusal::IdentityChanged) if !facts.has_pin && facts.change => {
            PinCommand::Go(Decision::none())
        }
        // Without a PIN nothing the user knows can confirm a key change.
        Err(TrustRefusal::IdentityChanged) if !facts.has_pin => {
            if !facts.may_accept_keys_without_pin {
                return PinCommand::Refused(Decision::say(event.answer(
                    "your account's security keys changed since I first saw them, and you \
                     have no PIN to confirm that with. Ask the operator to confirm your new \
                     keys; until then I take no PIN and no payment from you.",
                    "pin-refused",
                )));
            }
            let mut accepted = Decision {
                record: vec![
                    Record::AcceptIdentity {
                        user: event.sender.clone(),
                    },
                    Record::KeysAcceptedAtPinSet {
                        user: event.sender.clone(),
                    },
                ],
                ..Decision::none()
            };
            if let Some(dm) = facts.ready_dm {
                // Said in the DM, which the account's earlier sessions can read too.
                accepted.sends.push(super::Outgoing::notice(
                    dm,
                    "🔐 I accepted your account's new security keys (your cross-signing was \
                     reset). If you did not do that, tell the operator now.",
                    None,
                    "keys-accepted",
                    event.event_id.as_str(),
                ));
            }
            PinCommand::Go(accepted)
        }
        Err(refusal) => {
            let asked = if *refusal == TrustRefusal::IdentityChanged {
                ask_to_accept_identity()
            } else {
                Decision::none()
            };
            PinCommand::Refused(asked.then_send(event.answer(&refusal.to_string(), "pin-refused")))
        }
    }
}

/// `!pin set` / `!pin change` once the DM is known: opens the dialog (or says why not) and
/// prompts in the DM when it is ready (else the prompt follows the join).
pub fn open_pin_dialog(
    event: &EventRef,
    change: bool,
    has_pin: bool,
    dm: &super::challenge::Dm,
    now_ms: u64,
    timeout_ms: u64,
) -> Decision {
    let expires_at_ms = now_ms + timeout_ms;
    let (dialog, message) = match (change, has_pin) {
        (false, true) => (
            None,
            "You already have a PIN. To change it, send !pin change.",
        ),
        (true, false) => (None, "You have no PIN yet. Send !pin set to choose one."),
        (false, false) => (
            Some(Dialog::NewPin {
                expires_at_ms,
                change: false,
            }),
            "",
        ),
        (true, true) => (Some(Dialog::OldPin { expires_at_ms }), ""),
    };
    let mut decision = Decision::none();
    decision
        .sends
        .extend(super::challenge::pointer(event, dm, "pin-pointer"));
    if let Some(dialog) = &dialog {
        decision.store.push(Record::Dialog {
            user: event.sender.clone(),
            next: Some(dialog.clone()),
        });
    }
    if let super::challenge::Dm::Ready(dm_room) = dm {
        let text = dialog.as_ref().map_or(message, prompt);
        decision.sends.push(super::Outgoing::notice(
            dm_room,
            text,
            None,
            "pin-prompt",
            event.event_id.as_str(),
        ));
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::pin::PinWeakness;
    use ruma::{owned_event_id, owned_room_id, owned_user_id};

    const NOW_MS: u64 = 1_000;
    const TIMEOUT_MS: u64 = 300_000;

    fn event() -> EventRef {
        EventRef {
            room_id: owned_room_id!("!dm:hs"),
            event_id: owned_event_id!("$pin"),
            sender: owned_user_id!("@alice:hs"),
        }
    }

    fn facts() -> DialogFacts {
        DialogFacts {
            choosable: Ok(()),
            from_changed_identity: true,
            pin_exposed: false,
        }
    }

    fn next_of(decision: &Decision) -> Option<Option<Dialog>> {
        decision.record.iter().find_map(|r| match r {
            Record::DialogStep { next, .. } => Some(next.clone()),
            _ => None,
        })
    }

    /// Choosing a PIN: blocklisted ones are refused with the dialog kept open; a choosable one
    /// is hashed, then confirmed by the same PIN, which sets it; a different one starts over.
    #[test]
    fn choosing_a_pin() {
        let new = Dialog::NewPin {
            expires_at_ms: 10,
            change: false,
        };
        let easy = DialogFacts {
            choosable: Err(PinError::TooEasy(PinWeakness::Repeated)),
            ..facts()
        };
        let Need::Decided(refused) = need(&event(), &new, easy, NOW_MS, TIMEOUT_MS) else {
            panic!("a blocklisted PIN is refused without hashing")
        };
        assert_eq!(
            next_of(&refused),
            Some(Some(Dialog::NewPin {
                expires_at_ms: NOW_MS + TIMEOUT_MS,
                change: false
            }))
        );
        assert!(refused.texts()[0].contains("too easy to guess"));
        assert_eq!(
            need(&event(), &new, facts(), NOW_MS, TIMEOUT_MS),
            Need::Hash
        );
        let hashed = after(
            &event(),
            &new,
            Work::Hashed("$argon2id$h".into()),
            NOW_MS,
            TIMEOUT_MS,
        );
        let confirm = next_of(&hashed).flatten().expect("confirm step");
        assert!(matches!(&confirm, Dialog::ConfirmPin { hash, .. } if hash == "$argon2id$h"));
        assert_eq!(hashed.texts(), ["Send the same PIN again to confirm it."]);
        assert_eq!(
            need(&event(), &confirm, facts(), NOW_MS, TIMEOUT_MS),
            Need::Match("$argon2id$h".into())
        );
        let set = after(&event(), &confirm, Work::Matched(true), NOW_MS, TIMEOUT_MS);
        assert!(
            matches!(&set.record[0], Record::NewPin { hash, .. } if hash == "$argon2id$h"),
            "the PIN is stored before the step that ends the dialog"
        );
        assert_eq!(next_of(&set), Some(None));
        assert_eq!(set.finish, Some(owned_event_id!("$pin")));
        let differ = after(&event(), &confirm, Work::Matched(false), NOW_MS, TIMEOUT_MS);
        assert!(matches!(
            next_of(&differ),
            Some(Some(Dialog::NewPin { change: false, .. }))
        ));
    }

    /// Changing a PIN: the old one first; wrong leaves the dialog open, locked ends it.
    #[test]
    fn changing_a_pin() {
        let old = Dialog::OldPin { expires_at_ms: 10 };
        assert_eq!(
            need(&event(), &old, facts(), NOW_MS, TIMEOUT_MS),
            Need::CheckPin
        );
        let right = after(&event(), &old, Work::Checked(Ok(())), NOW_MS, TIMEOUT_MS);
        assert!(matches!(
            next_of(&right),
            Some(Some(Dialog::NewPin { change: true, .. }))
        ));
        let wrong = after(
            &event(),
            &old,
            Work::Checked(Err(PinError::Wrong { attempts_left: 2 })),
            NOW_MS,
            TIMEOUT_MS,
        );
        assert_eq!(next_of(&wrong), None, "the dialog stays as it is");
        assert_eq!(
            wrong.texts(),
            ["Wrong PIN. 2 attempts left before your PIN locks."]
        );
        let locked = after(
            &event(),
            &old,
            Work::Checked(Err(PinError::Locked { remaining_ms: 1 })),
            NOW_MS,
            TIMEOUT_MS,
        );
        assert_eq!(next_of(&locked), Some(None), "a locked PIN ends the dialog");
    }

    /// Identity changes: only a session of the new identity, with a PIN not exposed, may
    /// accept the keys; the acceptance is recorded before the step.
    #[test]
    fn accepting_changed_keys() {
        let accept = Dialog::AcceptIdentity { expires_at_ms: 10 };
        let other_session = DialogFacts {
            from_changed_identity: false,
            ..facts()
        };
        let Need::Decided(refused) = need(&event(), &accept, other_session, NOW_MS, TIMEOUT_MS)
        else {
            panic!("refused")
        };
        assert_eq!(next_of(&refused), Some(None));
        assert!(refused.texts()[0].starts_with("I did not use this PIN"));
        let exposed = DialogFacts {
            pin_exposed: true,
            ..facts()
        };
        let Need::Decided(refused) = need(&event(), &accept, exposed, NOW_MS, TIMEOUT_MS) else {
            panic!("refused")
        };
        assert!(refused.texts()[0].starts_with("Your PIN was exposed"));
        assert_eq!(
            need(&event(), &accept, facts(), NOW_MS, TIMEOUT_MS),
            Need::CheckPin
        );
        let accepted = after(&event(), &accept, Work::Checked(Ok(())), NOW_MS, TIMEOUT_MS);
        assert!(matches!(accepted.record[0], Record::AcceptIdentity { .. }));
        assert!(matches!(accepted.record[1], Record::DialogStep { .. }));
    }
}

#[cfg(test)]
mod pin_command_tests {
    use super::*;
    use crate::payments::core::challenge::Dm;
    use crate::policy::trust::TrustRefusal;
    use ruma::{owned_event_id, owned_room_id, owned_user_id};

    fn event() -> EventRef {
        EventRef {
            room_id: owned_room_id!("!room:hs"),
            event_id: owned_event_id!("$cmd"),
            sender: owned_user_id!("@alice:hs"),
        }
    }

    /// `!pin set` with a changed identity and no PIN: accepted when the operator said so or
    /// nothing could be taken over; else refused. With a PIN, the PIN must accept the keys.
    #[test]
    fn pin_commands_and_changed_identities() {
        let changed = Err(TrustRefusal::IdentityChanged);
        let dm = owned_room_id!("!dm:hs");
        let facts = |change, has_pin, may_accept| PinCommandFacts {
            change,
            has_pin,
            trust: &changed,
            may_accept_keys_without_pin: may_accept,
            ready_dm: Some(&dm),
        };
        let PinCommand::Go(accepted) =
            pin_command(&event(), facts(false, false, true), || unreachable!())
        else {
            panic!("accepted")
        };
        assert!(matches!(accepted.record[0], Record::AcceptIdentity { .. }));
        assert_eq!(accepted.purposes(), ["keys-accepted"]);
        let PinCommand::Refused(refused) =
            pin_command(&event(), facts(false, false, false), || unreachable!())
        else {
            panic!("refused")
        };
        assert_eq!(refused.purposes(), ["pin-refused"]);
        assert_eq!(
            pin_command(&event(), facts(true, false, false), || unreachable!()),
            PinCommand::Go(Decision::none()),
            "!pin change without a PIN is told to use !pin set"
        );
        let PinCommand::Refused(with_pin) = pin_command(&event(), facts(false, true, true), || {
            Decision::say(event().reply("asked", "identity-prompt"))
        }) else {
            panic!("refused")
        };
        assert_eq!(with_pin.purposes(), ["identity-prompt", "pin-refused"]);
    }

    #[test]
    fn pin_dialogs_open_by_what_the_user_has() {
        let dm = Dm::Ready(owned_room_id!("!dm:hs"));
        let set = open_pin_dialog(&event(), false, false, &dm, 0, 10);
        assert_eq!(set.purposes(), ["pin-pointer", "pin-prompt"]);
        assert!(set.texts()[1].starts_with("Choose a 4-digit PIN"));
        let again = open_pin_dialog(&event(), false, true, &dm, 0, 10);
        assert!(again.store.is_empty());
        assert_eq!(
            again.texts()[1],
            "You already have a PIN. To change it, send !pin change."
        );
        let change = open_pin_dialog(&event(), true, true, &dm, 0, 10);
        assert_eq!(
            change.store,
            [Record::Dialog {
                user: owned_user_id!("@alice:hs"),
                next: Some(Dialog::OldPin { expires_at_ms: 10 })
            }]
        );
        let invited = open_pin_dialog(
            &event(),
            false,
            false,
            &Dm::Invited(owned_room_id!("!dm:hs")),
            0,
            10,
        );
        assert_eq!(
            invited.purposes(),
            ["pin-pointer"],
            "the prompt follows the join"
        );
        assert_eq!(invited.store.len(), 1);
    }
}
