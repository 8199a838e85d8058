//! A session's page: transcript, document history with authorship, ratings, answers, events,
//! the audit trail, comparison candidates and rewards; and the handover a researcher allows.

use actix_web::{get, post, web, HttpRequest};
use askama::Template;

use super::{check_csrf, csrf, page, participant_label, researcher, CsrfForm, Page};
use crate::db;
use crate::db::vocab::RevisionAuthor;
use crate::results;
use crate::web::{see_other, ApiError, AppState};

#[derive(Template)]
#[template(path = "console_session.html")]
struct SessionPage<'a> {
    who: &'a str,
    csrf: &'a str,
    slug: String,
    session: db::models::Session,
    participant: String,
    arm: String,
    messages: Vec<db::models::Message>,
    /// Each revision with its change against the previous one.
    revisions: Vec<(db::models::DocumentRevision, Vec<results::Change>)>,
    /// Share of the final document typed by the participant and inserted from the assistant.
    typed_percent: String,
    inserted_percent: String,
    ratings: Vec<db::models::Rating>,
    answers: Vec<db::models::Answer>,
    events: Vec<db::models::Event>,
    /// Entries refused, moves to another browser, handovers.
    audit: Vec<db::audit::AuditEvent>,
    /// Replies of comparison turns and regenerations, with the participant's pick.
    candidates: Vec<db::models::Candidate>,
    rewards: Vec<RewardRow>,
}

/// A multiturn-aware reward of a reply, as `collabllm pairs` stored it.
struct RewardRow {
    /// The assistant message whose context was scored.
    turn: i32,
    /// "reply given" or the candidate's text.
    reply: String,
    mr: String,
    std: String,
    bleu: String,
    interactivity: String,
    tokens: String,
    settings: String,
}

impl RewardRow {
    fn of(reward: db::models::Reward, candidates: &[db::models::Candidate]) -> Self {
        let components: serde_json::Value =
            serde_json::from_str(&reward.components_json).unwrap_or_default();
        let metric = |key: &str| {
            components["means"][key]
                .as_f64()
                .map_or_else(|| "—".to_string(), |x| format!("{x:.3}"))
        };
        let reply = match reward.candidate_id {
            None => "reply given".to_string(),
            Some(id) => candidates
                .iter()
                .find(|c| c.id == id)
                .map_or_else(|| format!("candidate {id}"), |c| c.content.clone()),
        };
        Self {
            turn: reward.turn,
            reply,
            mr: format!("{:.3}", reward.mr),
            std: format!("{:.3}", reward.mr_std),
            bleu: metric("bleu"),
            interactivity: metric("interactivity"),
            tokens: metric("tokens_k"),
            settings: format!(
                "S={} w={} · {}",
                components["samples"],
                components["window"],
                reward.config_sha256.chars().take(8).collect::<String>()
            ),
        }
    }
}

#[get("/console/sessions/{id}")]
pub(crate) async fn show_session(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Page {
    let who = researcher(&req, &state).await?;
    let (token, _) = csrf(&req, &state.console_key);
    let id = id.into_inner();
    let page_data = state
        .db(move |conn| {
            let session = db::sessions::find_by_public_id(conn, &id)?
                .ok_or_else(|| ApiError::NotFound(format!("there is no session {id:?}")))?;
            let version = db::studies::version(conn, session.study_version_id)?;
            let study = db::studies::get(conn, version.study_id)?;
            let arm = db::studies::arms_of(conn, version.id)?
                .into_iter()
                .find(|a| Some(a.id) == session.arm_id)
                .map_or_else(|| "—".to_string(), |a| a.name);
            let participant = db::participants::get(conn, session.participant_id)?;
            let candidates = db::candidates::list_for_session(conn, session.id)?;
            let rewards: Vec<RewardRow> = db::rewards::list_for_session(conn, session.id)?
                .into_iter()
                .map(|r| RewardRow::of(r, &candidates))
                .collect();
            Ok((
                study.slug,
                participant_label(&participant),
                arm,
                db::messages::list_for_session(conn, session.id)?,
                db::revisions::list_for_session(conn, session.id)?,
                db::ratings::list_for_session(conn, session.id)?,
                db::answers::list_for_session(conn, session.id)?,
                db::events::list_for_session(conn, session.id)?,
                db::audit::list_for_session(conn, session.id)?,
                candidates,
                session,
                rewards,
            ))
        })
        .await?;
    let (
        slug,
        participant,
        arm,
        messages,
        revisions,
        ratings,
        answers,
        events,
        audit,
        candidates,
        session,
        rewards,
    ) = page_data;
    let history: Vec<(RevisionAuthor, String)> = revisions
        .iter()
        .map(|r| (r.author, r.content.clone()))
        .collect();
    let (changes, typed, inserted) = results::authorship(&history);
    let percent = |part: usize| {
        if typed + inserted == 0 {
            "—".to_string()
        } else {
            format!("{:.0}%", 100.0 * part as f64 / (typed + inserted) as f64)
        }
    };
    let (typed_percent, inserted_percent) = (percent(typed), percent(inserted));
    let revisions = revisions.into_iter().zip(changes).collect();
    page(&SessionPage {
        who: &who.name,
        csrf: &token,
        slug,
        session,
        participant,
        arm,
        messages,
        revisions,
        typed_percent,
        inserted_percent,
        ratings,
        answers,
        events,
        audit,
        candidates,
        rewards,
    })
}

/// A participant who lost their browser (and cannot prove who they are with Prolific's session
/// id) asked the researchers for help: the next entry with their participant id takes the session
/// over in a new browser. Recorded in the session's audit trail.
#[post("/console/sessions/{id}/handover")]
pub(crate) async fn allow_handover(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    form: web::Form<CsrfForm>,
) -> Page {
    let who = researcher(&req, &state).await?;
    check_csrf(&req, &state.console_key, &form.csrf)?;
    let id = id.into_inner();
    let public_id = id.clone();
    state
        .db(move |conn| {
            let session = db::sessions::find_by_public_id(conn, &id)?
                .ok_or_else(|| ApiError::NotFound(format!("there is no session {id:?}")))?;
            db::write_transaction(conn, |conn| {
                db::sessions::allow_handover(conn, session.id)?;
                db::audit::record(
                    conn,
                    session.id,
                    "handover_allowed",
                    &serde_json::json!({"researcher": who.name}),
                )
            })?;
            Ok(())
        })
        .await?;
    Ok(see_other(format!("/console/sessions/{public_id}")))
}
