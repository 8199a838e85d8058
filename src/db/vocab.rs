//! The stored vocabulary: session states, outcomes, message roles, revision authors and candidate
//! sources. Stored as text, parsed into these enums where rows are read (a value the code does not
//! know is a read error, never a silent fallback), and matched exhaustively everywhere else, so a
//! new state cannot be forgotten by a page, the console, the codebook or the simulator.

/// A stored text that names none of an enum's values.
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} {value:?} in the database")]
pub struct UnknownValue {
    kind: &'static str,
    value: String,
}

/// A nullable text column as read, before it is parsed into an `Option` of a stored enum.
pub struct NullableText(Option<String>);

impl<DB> diesel::deserialize::Queryable<diesel::sql_types::Nullable<diesel::sql_types::Text>, DB>
    for NullableText
where
    DB: diesel::backend::Backend,
    Option<String>:
        diesel::deserialize::FromSql<diesel::sql_types::Nullable<diesel::sql_types::Text>, DB>,
{
    type Row = Option<String>;

    fn build(row: Option<String>) -> diesel::deserialize::Result<Self> {
        Ok(NullableText(row))
    }
}

/// Declares a stored enum: its text form, parsing, serde in the same spelling and the list of all
/// values in order.
macro_rules! stored_enum {
    ($(#[$meta:meta])* $name:ident as $kind:literal {
        $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in the order the codebook lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue { kind: $kind, value: other.to_string() }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownValue;

            fn try_from(s: String) -> Result<Self, UnknownValue> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }

        impl TryFrom<NullableText> for Option<$name> {
            type Error = UnknownValue;

            fn try_from(t: NullableText) -> Result<Self, UnknownValue> {
                t.0.map(|s| s.parse()).transpose()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

stored_enum! {
    /// Where a session stands.
    SessionState as "session state" {
        /// Waiting for the participant's consent.
        Consent => "consent",
        /// Consent refused; ended.
        Declined => "declined",
        Chatting => "chatting",
        /// Two candidate replies wait for the participant's pick.
        Choosing => "choosing",
        /// A periodic rating is due before the next message.
        Rating => "rating",
        /// The final ratings and questionnaire are due.
        Final => "final",
        /// Completed; the completion code was shown.
        Finished => "finished",
        /// Idle past the protocol's limit; ended.
        TimedOut => "timed_out",
        /// Ended unfinished by whoever ran it (a stopped simulation); ended, with no code.
        Abandoned => "abandoned",
    }
}

impl SessionState {
    /// Sessions a participant is still working in.
    pub const OPEN: [SessionState; 5] = [
        SessionState::Consent,
        SessionState::Chatting,
        SessionState::Choosing,
        SessionState::Rating,
        SessionState::Final,
    ];
    /// Sessions that count towards an arm's fill: assigned, and active or completed.
    pub const FILLING: [SessionState; 5] = [
        SessionState::Chatting,
        SessionState::Choosing,
        SessionState::Rating,
        SessionState::Final,
        SessionState::Finished,
    ];

    /// Whether the session has ended (an outcome and its code are set).
    pub fn has_ended(self) -> bool {
        match self {
            SessionState::Declined
            | SessionState::Finished
            | SessionState::TimedOut
            | SessionState::Abandoned => true,
            SessionState::Consent
            | SessionState::Chatting
            | SessionState::Choosing
            | SessionState::Rating
            | SessionState::Final => false,
        }
    }

    /// The text forms of `states`, for `IN (…)` filters.
    pub fn texts(states: &[SessionState]) -> Vec<&'static str> {
        states.iter().map(|s| s.as_str()).collect()
    }
}

stored_enum! {
    /// How an ended session ended; each but `abandoned` has a completion code in the protocol.
    Outcome as "outcome" {
        Completed => "completed",
        NoConsent => "no_consent",
        TimedOut => "timed_out",
        /// A simulated participant stopped before it finished.
        Abandoned => "abandoned",
    }
}

impl Outcome {
    /// The state a session ends in with this outcome.
    pub fn ended_state(self) -> SessionState {
        match self {
            Outcome::Completed => SessionState::Finished,
            Outcome::NoConsent => SessionState::Declined,
            Outcome::TimedOut => SessionState::TimedOut,
            Outcome::Abandoned => SessionState::Abandoned,
        }
    }
}

stored_enum! {
    /// Who wrote a chat message.
    MessageRole as "message role" {
        User => "user",
        Assistant => "assistant",
    }
}

stored_enum! {
    /// Who made a document revision.
    RevisionAuthor as "revision author" {
        /// Typed by the participant.
        User => "user",
        /// An assistant reply inserted with the insert button.
        AssistantInsert => "assistant_insert",
    }
}

stored_enum! {
    /// Why an alternative reply was generated.
    CandidateSource as "candidate source" {
        /// One of two replies of a comparison turn.
        Compare => "compare",
        /// A reply the participant asked to replace, or its replacement.
        Regenerate => "regenerate",
        /// A fresh candidate scored by the multiturn-aware reward.
        Mr => "mr",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reads_back_from_its_text() {
        for s in SessionState::ALL {
            assert_eq!(s.as_str().parse::<SessionState>().unwrap(), *s);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>().unwrap(), *o);
        }
    }

    #[test]
    fn unknown_text_is_an_error_that_names_it() {
        let e = "screened_out".parse::<Outcome>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown outcome \"screened_out\" in the database"
        );
    }
}
