//! Entering a study: resume by cookie or external id, or start a new session; consent and the
//! assignment draw that follows it.

use std::sync::Arc;

use serde_json::json;

use super::assign::{self, ArmState};
use super::{new_token, token_hash, Studio, StudyError};
use crate::db::models::{NewAssignment, NewMessage, NewSession, Session, Study};
use crate::db::vocab::{MessageRole, Outcome, RevisionAuthor, SessionState};
use crate::db::{self, DbConn};
use crate::engine::{ChatMessage, Role};
use crate::protocol::{sha256_hex, OutcomeSpec, Protocol};

/// Where a participant stands after entering.
#[derive(Debug, Clone)]
pub struct Entry {
    pub study: Study,
    pub session: Session,
    /// A new token to give the browser (absent when the browser's own token was used).
    pub new_token: Option<String>,
}

/// What a participant's link carries besides the study: Prolific's ids, when it came from there.
#[derive(Debug, Clone, Default)]
pub struct Arrival {
    /// `PROLIFIC_PID`: who they are. Not a secret: researchers and other studies see it.
    pub external_id: Option<String>,
    /// Prolific's `SESSION_ID`: issued for this participant's place in this study and known only
    /// to them and Prolific, so it proves a second browser is theirs.
    pub resume_proof: Option<String>,
}

impl Studio {
    /// A participant arrives at `/s/{slug}`: the session of their browser token, else a new one.
    /// An external id that already has a session opens it in this browser only with proof (the
    /// same Prolific `SESSION_ID`, or a researcher's handover); otherwise the entry is refused and
    /// recorded, and the browser that has the session keeps it. Never a second session or arm for
    /// the same external id. `may_start` false refuses to start a new session (the client started
    /// too many); returning to one is always possible.
    pub async fn enter(
        self: &Arc<Self>,
        slug: String,
        arrival: Arrival,
        browser_token: Option<String>,
        may_start: bool,
    ) -> Result<Entry, StudyError> {
        let non_empty =
            |v: Option<String>| v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let external = non_empty(arrival.external_id).map(|id| self.external_id_hmac(&slug, &id));
        let proof = non_empty(arrival.resume_proof)
            .map(|p| self.external_id_hmac(&slug, &format!("resume\0{p}")));
        let by_link = external.clone();
        let (study, by_cookie) = self
            .db(move |conn| {
                let study = db::studies::find_by_slug(conn, &slug)?
                    .ok_or(StudyError::UnknownStudy(slug))?;
                let by_cookie = session_of_token(conn, &study, browser_token.as_deref())?;
                // A browser shared by two participants: the external id in the link decides.
                let by_cookie = match (by_cookie, &by_link) {
                    (Some(s), Some(hmac)) => {
                        let owner = db::participants::get(conn, s.participant_id)?;
                        (owner.external_id_hmac.as_ref() == Some(hmac)).then_some(s)
                    }
                    (found, _) => found,
                };
                Ok::<_, StudyError>((study, by_cookie))
            })
            .await?;
        if let Some(session) = by_cookie {
            return Ok(Entry {
                study,
                session,
                new_token: None,
            });
        }
        let entered = self
            .write(move |conn| {
                let entered = start_or_move(conn, study, external, proof, may_start)?;
                // A refused entry changes nothing but the record of it.
                if let Err(session) = &entered {
                    db::audit::record(
                        conn,
                        session.id,
                        "entry_refused",
                        &json!({"reason": "open in another browser", "state": session.state}),
                    )?;
                }
                Ok::<_, StudyError>(entered)
            })
            .await?;
        entered.map_err(|session| StudyError::OpenElsewhere {
            ended: session.state.has_ended(),
        })
    }

    /// The session a browser token opens in this study, if any.
    pub async fn session_for_token(
        self: &Arc<Self>,
        slug: String,
        token: String,
    ) -> Result<Option<(Study, Session)>, StudyError> {
        self.db(move |conn| {
            let Some(study) = db::studies::find_by_slug(conn, &slug)? else {
                return Ok(None);
            };
            Ok(session_of_token(conn, &study, Some(&token))?.map(|s| (study, s)))
        })
        .await
    }

    /// The protocol of a session's study version.
    pub async fn protocol_of(
        self: &Arc<Self>,
        session: &Session,
    ) -> Result<Arc<Protocol>, StudyError> {
        let this = self.clone();
        let version_id = session.study_version_id;
        self.db(move |conn| this.protocol(conn, version_id)).await
    }

    /// Consent given: stores it with the consent text's sha256, draws arm, task and topic, and
    /// opens the workspace. Repeated calls change nothing.
    pub async fn agree(self: &Arc<Self>, session_id: i64) -> Result<Session, StudyError> {
        self.agree_as(session_id, None).await
    }

    /// [`Studio::agree`], assigning `arm` when given (a researcher's preview of one arm; recorded
    /// as a forced draw).
    pub async fn agree_as(
        self: &Arc<Self>,
        session_id: i64,
        arm: Option<String>,
    ) -> Result<Session, StudyError> {
        let this = self.clone();
        self.writer
            .write_in_turn(move |conn| {
                let session = db::sessions::get(conn, session_id)?;
                if session.state != SessionState::Consent {
                    return Ok(session);
                }
                let protocol = this.protocol(conn, session.study_version_id)?;
                db::sessions::record_consent(
                    conn,
                    session.id,
                    &sha256_hex(protocol.consent.text.as_bytes()),
                )?;
                draw(conn, &protocol, &session, arm.as_deref())?;
                Ok(db::sessions::set_state(
                    conn,
                    session.id,
                    SessionState::Chatting,
                )?)
            })
            .await
    }

    /// A simulated participant: a new participant flagged `simulated` and a session past consent,
    /// assigned like anyone (or to `arm` when given, recorded as a forced draw). Returns the
    /// session and its token for the websocket `hello`. Works whatever the study's status, so a
    /// paused study can be piloted before it opens. Its replies are sampled with seeds drawn from
    /// `seed` and the turn.
    pub async fn enter_simulated(
        self: &Arc<Self>,
        slug: String,
        arm: Option<String>,
        seed: u64,
    ) -> Result<(Session, String), StudyError> {
        let this = self.clone();
        self.writer
            .write_in_turn(move |conn| {
                let (session, protocol, token) = this.simulated_session(conn, slug, Some(seed))?;
                draw(conn, &protocol, &session, arm.as_deref())?;
                let session = db::sessions::set_state(conn, session.id, SessionState::Chatting)?;
                Ok((session, token))
            })
            .await
    }

    /// A simulated user's whole conversation that ran outside the websocket (`eval`), stored as
    /// a completed simulated session of `arm`: consent, the messages, the final document. It is
    /// not drawn, so it has no ledger row, and like every simulated session it never counts for
    /// people's assignment. `task` is the protocol's (task, topic) when the user had one.
    pub async fn record_simulated(
        self: &Arc<Self>,
        slug: String,
        arm: String,
        task: Option<(String, String)>,
        messages: Vec<ChatMessage>,
        document: String,
    ) -> Result<Session, StudyError> {
        let this = self.clone();
        self.write(move |conn| {
            let (session, protocol, _) = this.simulated_session(conn, slug, None)?;
            let arm_id = db::studies::arms_of(conn, session.study_version_id)?
                .into_iter()
                .find(|a| a.name == arm)
                .ok_or_else(|| StudyError::Protocol(format!("the study has no arm {arm:?}")))?
                .id;
            let (task_id, topic_id) = task.unzip();
            db::sessions::assign(
                conn,
                session.id,
                arm_id,
                task_id.as_deref(),
                topic_id.as_deref(),
            )?;
            for m in &messages {
                let role = match m.role {
                    Role::User => MessageRole::User,
                    Role::Assistant => MessageRole::Assistant,
                    Role::System => continue,
                };
                db::messages::append(
                    conn,
                    session.id,
                    &NewMessage {
                        role,
                        content: &m.content,
                        ..Default::default()
                    },
                )?;
            }
            if !document.is_empty() {
                db::revisions::append(conn, session.id, RevisionAuthor::User, None, &document)?;
            }
            Ok(db::sessions::finish(
                conn,
                session.id,
                Outcome::Completed,
                &protocol.outcomes.completed.code,
            )?)
        })
        .await
    }

    /// A new simulated participant's consented session of the study's current version, with its
    /// protocol and token: how a pilot's session and an evaluation's recorded one begin.
    fn simulated_session(
        &self,
        conn: &mut DbConn,
        slug: String,
        seed: Option<u64>,
    ) -> Result<(Session, Arc<Protocol>, String), StudyError> {
        let study =
            db::studies::find_by_slug(conn, &slug)?.ok_or(StudyError::UnknownStudy(slug))?;
        let version = db::studies::current_version(conn, study.id)?;
        let protocol = self.protocol(conn, version.id)?;
        let (participant, _) = db::participants::find_or_create(conn, study.id, None, true)?;
        let (token, hash) = new_token();
        let session = new_session(conn, participant.id, version.id, &hash, None, seed)?;
        db::sessions::record_consent(
            conn,
            session.id,
            &sha256_hex(protocol.consent.text.as_bytes()),
        )?;
        Ok((session, protocol, token))
    }

    /// Consent refused: the session ends with the protocol's "no consent" outcome.
    pub async fn decline(self: &Arc<Self>, session_id: i64) -> Result<Session, StudyError> {
        let this = self.clone();
        self.db(move |conn| {
            let session = db::sessions::get(conn, session_id)?;
            if session.state != SessionState::Consent {
                return Ok(session);
            }
            let protocol = this.protocol(conn, session.study_version_id)?;
            Ok(db::sessions::finish(
                conn,
                session.id,
                Outcome::NoConsent,
                &protocol.outcomes.no_consent.code,
            )?)
        })
        .await
    }
}

/// A participant's new session under a study version, waiting for consent.
/// A browser without the study's cookie: the participant's session moved to it when the link
/// proves it theirs (or a researcher allowed a handover), else a new session when one may start.
/// `Err` is the session kept by another browser.
fn start_or_move(
    conn: &mut DbConn,
    study: Study,
    external: Option<String>,
    proof: Option<String>,
    may_start: bool,
) -> Result<Result<Entry, Session>, StudyError> {
    let (participant, _) =
        db::participants::find_or_create(conn, study.id, external.as_deref(), false)?;
    let (token, hash) = new_token();
    if let Some(session) = db::sessions::latest_of_participant(conn, participant.id)? {
        let proven = proof.is_some() && session.resume_proof_hmac == proof;
        if !proven && !session.handover_allowed {
            return Ok(Err(session));
        }
        db::sessions::move_to_browser(conn, session.id, &hash)?;
        let how = if proven { "resume_proof" } else { "handover" };
        db::audit::record(
            conn,
            session.id,
            "moved_to_new_browser",
            &json!({"by": how}),
        )?;
        return Ok(Ok(Entry {
            study,
            session,
            new_token: Some(token),
        }));
    }
    if study.status != "active" {
        return Err(StudyError::NotAccepting);
    }
    if !may_start {
        return Err(StudyError::TooManyStarted);
    }
    let version = db::studies::current_version(conn, study.id)?;
    let session = new_session(
        conn,
        participant.id,
        version.id,
        &hash,
        proof.as_deref(),
        None,
    )?;
    Ok(Ok(Entry {
        study,
        session,
        new_token: Some(token),
    }))
}

fn new_session(
    conn: &mut DbConn,
    participant_id: i64,
    study_version_id: i64,
    token_hash: &str,
    resume_proof_hmac: Option<&str>,
    simulation_seed: Option<u64>,
) -> Result<Session, StudyError> {
    let now = db::now();
    let public_id = uuid::Uuid::new_v4().to_string();
    Ok(db::sessions::create(
        conn,
        &NewSession {
            public_id: &public_id,
            participant_id,
            study_version_id,
            arm_id: None,
            task_id: None,
            topic_id: None,
            token_hash,
            state: SessionState::Consent,
            resume_proof_hmac,
            started_at: now,
            last_activity_at: now,
            // Stored as the same 64 bits: PostgreSQL has no unsigned integer.
            simulation_seed: simulation_seed.map(|s| s as i64),
        },
    )?)
}

fn session_of_token(
    conn: &mut DbConn,
    study: &Study,
    token: Option<&str>,
) -> Result<Option<Session>, StudyError> {
    let Some(token) = token else { return Ok(None) };
    let Some(session) = db::sessions::find_by_token_hash(conn, &token_hash(token))? else {
        return Ok(None);
    };
    let version = db::studies::version(conn, session.study_version_id)?;
    Ok((version.study_id == study.id).then_some(session))
}

/// Draws the session's arm and topic and writes the draw to the ledger. A participant who was
/// drawn before (under this version) keeps that draw.
fn draw(
    conn: &mut DbConn,
    protocol: &Protocol,
    session: &Session,
    forced_arm: Option<&str>,
) -> Result<(), StudyError> {
    let version_id = session.study_version_id;
    db::assignments::lock_ledger(conn, version_id)?;
    if let Some(previous) =
        db::assignments::find_for_participant(conn, version_id, session.participant_id)?
    {
        db::sessions::assign(
            conn,
            session.id,
            previous.arm_id,
            Some(&previous.task_id),
            Some(&previous.topic_id),
        )?;
        return Ok(());
    }
    let arms = db::studies::arms_of(conn, version_id)?;
    // People and simulated participants are balanced, filled and sequenced apart: a pilot never
    // takes a person's place in an arm, its quota or the seeded order of draws.
    let simulated = db::participants::get(conn, session.participant_id)?.simulated;
    let filled = db::sessions::count_by_arm(conn, version_id, &SessionState::FILLING, simulated)?;
    let arm_states: Vec<ArmState> = arms
        .iter()
        .map(|a| ArmState {
            arm_id: a.id,
            name: a.name.clone(),
            weight: a.weight,
            quota: a.quota,
            filled: filled
                .iter()
                .find(|(id, _)| *id == a.id)
                .map_or(0, |(_, n)| *n),
        })
        .collect();
    let draws = db::assignments::count_for_version(conn, version_id, simulated)?;
    let rules = &protocol.session;
    let arm = match forced_arm {
        Some(name) => {
            let arm = arms.iter().find(|a| a.name == name).ok_or_else(|| {
                StudyError::Protocol(format!(
                    "the study has no arm {name:?}; its arms are: {}",
                    arms.iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            assign::ArmDraw {
                arm_id: arm.id,
                method: "forced",
                inputs: json!({"forced": name}),
            }
        }
        None => assign::choose_arm(rules.assignment, rules.assignment_seed, draws, &arm_states)
            .ok_or(StudyError::Full)?,
    };
    let bank: Vec<(String, Vec<String>)> = protocol
        .tasks
        .iter()
        .map(|t| {
            (
                t.id.clone(),
                t.topics.iter().map(|p| p.id.clone()).collect(),
            )
        })
        .collect();
    let counts = db::assignments::task_counts(conn, version_id, simulated)?;
    let (task, topic) = assign::choose_topic(rules.assignment_seed, draws, &bank, &counts);
    let inputs = json!({"arm": arm.inputs, "topic_counts": counts});
    db::assignments::record(
        conn,
        &NewAssignment {
            study_version_id: version_id,
            participant_id: session.participant_id,
            method: arm.method,
            arm_id: arm.arm_id,
            task_id: &task,
            topic_id: &topic,
            inputs_json: &inputs.to_string(),
        },
    )?;
    db::sessions::assign(conn, session.id, arm.arm_id, Some(&task), Some(&topic))?;
    Ok(())
}

/// The completion view of an outcome: its code and redirect with `{code}` filled in.
pub(super) fn completed_view(outcome: &OutcomeSpec) -> super::frames::CompletedView {
    super::frames::CompletedView {
        code: outcome.code.clone(),
        redirect: outcome
            .redirect
            .as_ref()
            .map(|r| r.replace("{code}", &outcome.code)),
        message: outcome.message.clone(),
    }
}
