//! The journal: what a handler did, as data, and how a replay follows it.
//!
//! An invocation's journal is a totally ordered list of entries. A
//! [`Command`] is something the handler asked for (read state, run a step);
//! a [`Completion`] is the answer, linked to its command by the command's
//! index. Keeping the two apart is what makes replay order total even when
//! answers arrive in a different order than the questions (timers, calls):
//! the journal records the order in which the handler *observed* them.
//!
//! Replay rule (the same for every host function, see [`Journal::issue`]):
//! the handler's k-th command must equal the k-th journaled command in kind
//! and name; then its journaled completion is returned and nothing is
//! executed. A different command is a [`JournalMismatch`]: the invocation
//! stops and the journal is never overwritten. Past the end of the journal
//! the handler runs live and new entries are appended.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Something the handler asked the host for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Read one state value.
    GetState { name: String },
    /// Write one state value.
    SetState { name: String, value: Vec<u8> },
    /// Remove one state value.
    ClearState { name: String },
    /// Remove every state value of the key.
    ClearAllState,
    /// List the key's state names.
    GetStateKeys,
    /// A durable side-effect step.
    Run { name: String },
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Index of the command this answers (0 = the handler's first command).
    pub command: u32,
    /// The answer.
    pub value: CompletionValue,
}

/// The payload of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CompletionValue {
    /// A state value, or none.
    State(Option<Vec<u8>>),
    /// State names.
    StateKeys(Vec<String>),
    /// A step's (or a pending operation's) outcome.
    Outcome(Outcome),
}

/// Success or terminal failure, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// JSON-encoded value.
    Success(Vec<u8>),
    /// Terminal failure with a status code.
    Failure { code: u16, message: String },
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// A command the handler issued.
    Command(Command),
    /// An answer to an earlier command.
    Completion(Completion),
}

impl Entry {
    /// The stored form (postcard: compact and stable for a given enum shape;
    /// new variants are only ever appended).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("journal entries always encode")
    }

    /// Decode a stored entry.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

impl Command {
    /// The kind and name that replay compares, e.g. `run "charge"`.
    pub fn signature(&self) -> String {
        match self {
            Command::GetState { name } => format!("get-state {name:?}"),
            Command::SetState { name, .. } => format!("set-state {name:?}"),
            Command::ClearState { name } => format!("clear-state {name:?}"),
            Command::ClearAllState => "clear-all-state".into(),
            Command::GetStateKeys => "state-keys".into(),
            Command::Run { name } => format!("run {name:?}"),
        }
    }
}

/// A handler issued a different command than the journal holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "journal mismatch at entry {entry}: the journal has {journaled}, the handler issued {issued}"
)]
pub struct JournalMismatch {
    /// Index of the journal entry that differs.
    pub entry: u32,
    /// What the journal holds there.
    pub journaled: String,
    /// What the handler issued instead.
    pub issued: String,
}

/// What to do with a command the handler just issued.
#[derive(Debug, PartialEq)]
pub enum Issued {
    /// Already journaled: return this completion (if the command has one)
    /// and execute nothing.
    Replayed(Option<CompletionValue>),
    /// New: execute it and journal it at these positions.
    Live {
        /// The command's index (its handle).
        command: u32,
        /// The entry index the command goes to.
        entry: u32,
    },
}

/// An invocation's journal during one attempt: the entries loaded at the
/// start plus a cursor.
#[derive(Debug, Default)]
pub struct Journal {
    /// (entry index, command) for every journaled command, in order.
    commands: Vec<(u32, Command)>,
    /// Completions by command index.
    completions: HashMap<u32, CompletionValue>,
    /// Commands the handler issued so far in this attempt.
    next_command: u32,
    /// Index the next appended entry gets.
    next_entry: u32,
}

impl Journal {
    /// Rebuild from stored entries, in entry order.
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Self {
        let mut journal = Journal::default();
        for entry in entries {
            match entry {
                Entry::Command(c) => journal.commands.push((journal.next_entry, c)),
                Entry::Completion(c) => {
                    journal.completions.insert(c.command, c.value);
                }
            }
            journal.next_entry += 1;
        }
        journal
    }

    /// Whether the handler is still replaying journaled commands.
    pub fn is_replaying(&self) -> bool {
        (self.next_command as usize) < self.commands.len()
    }

    /// The handler issued `command`: match it against the journal.
    pub fn issue(&mut self, command: &Command) -> Result<Issued, JournalMismatch> {
        let index = self.next_command;
        match self.commands.get(index as usize) {
            Some((entry, journaled)) => {
                if journaled.signature() != command.signature() {
                    return Err(JournalMismatch {
                        entry: *entry,
                        journaled: journaled.signature(),
                        issued: command.signature(),
                    });
                }
                self.next_command += 1;
                Ok(Issued::Replayed(self.completions.get(&index).cloned()))
            }
            None => {
                self.next_command += 1;
                Ok(Issued::Live {
                    command: index,
                    entry: self.reserve(),
                })
            }
        }
    }

    /// Reserve the next entry index (for a completion).
    pub fn reserve(&mut self) -> u32 {
        let entry = self.next_entry;
        self.next_entry += 1;
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str) -> Command {
        Command::Run { name: name.into() }
    }

    fn done(command: u32, value: &[u8]) -> Entry {
        Entry::Completion(Completion {
            command,
            value: CompletionValue::Outcome(Outcome::Success(value.to_vec())),
        })
    }

    #[test]
    fn entries_round_trip_through_their_encoding() {
        let entries = vec![
            Entry::Command(Command::SetState {
                name: "count".into(),
                value: b"41".to_vec(),
            }),
            Entry::Command(Command::ClearAllState),
            done(3, b"\"ok\""),
            Entry::Completion(Completion {
                command: 1,
                value: CompletionValue::Outcome(Outcome::Failure {
                    code: 409,
                    message: "no".into(),
                }),
            }),
            Entry::Completion(Completion {
                command: 2,
                value: CompletionValue::StateKeys(vec!["a".into(), "b".into()]),
            }),
        ];
        for e in entries {
            assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        }
        assert!(Entry::decode(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn the_encoding_is_stable() {
        // Stored journals must stay readable: the bytes of an entry may never change.
        assert_eq!(Entry::Command(run("a")).encode(), vec![0, 5, 1, b'a']);
        assert_eq!(done(2, b"1").encode(), vec![1, 2, 2, 0, 1, b'1']);
    }

    #[test]
    fn replay_returns_journaled_completions_then_goes_live() {
        let mut j = Journal::from_entries(vec![
            Entry::Command(run("one")),
            done(0, b"1"),
            Entry::Command(run("two")),
            done(1, b"2"),
        ]);
        assert!(j.is_replaying());
        let first = j.issue(&run("one")).unwrap();
        assert_eq!(
            first,
            Issued::Replayed(Some(CompletionValue::Outcome(Outcome::Success(
                b"1".to_vec()
            ))))
        );
        j.issue(&run("two")).unwrap();
        assert!(!j.is_replaying());
        assert_eq!(
            j.issue(&run("three")).unwrap(),
            Issued::Live {
                command: 2,
                entry: 4
            }
        );
        assert_eq!(j.reserve(), 5);
    }

    #[test]
    fn a_different_command_is_a_mismatch_naming_the_entry() {
        let mut j = Journal::from_entries(vec![
            Entry::Command(run("one")),
            done(0, b"1"),
            Entry::Command(run("two")),
            done(1, b"2"),
        ]);
        j.issue(&run("one")).unwrap();
        let err = j
            .issue(&Command::GetState { name: "x".into() })
            .unwrap_err();
        assert_eq!(err.entry, 2);
        assert_eq!(
            err.to_string(),
            "journal mismatch at entry 2: the journal has run \"two\", the handler issued get-state \"x\""
        );
        let mut j = Journal::from_entries(vec![Entry::Command(run("one")), done(0, b"1")]);
        assert!(
            j.issue(&run("uno")).is_err(),
            "a renamed step is a mismatch too"
        );
    }
}
