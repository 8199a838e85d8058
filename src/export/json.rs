//! The full dump: one JSON document per study (its protocol versions, every session with its
//! messages, revisions, ratings, answers and events, and the assignment ledger) for archiving
//! and re-analysis. Written session by session, so memory stays flat.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use super::{for_each_session, study_versions, timestamp, ExportError};
use crate::db::{self, DbConn};

/// Identifies the layout of the dump.
pub const FORMAT: &str = "collabllm-study-dump/1";

/// Writes the dump of study `slug` to `path`; returns the number of sessions.
pub fn export(
    conn: &mut DbConn,
    slug: &str,
    path: &Path,
    progress: &dyn Fn(u64),
) -> Result<u64, ExportError> {
    let study = db::studies::find_by_slug(conn, slug)?
        .ok_or_else(|| ExportError::UnknownStudy(slug.into()))?;
    let write_err = |source: std::io::Error| ExportError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::create(path).map_err(write_err)?;
    let mut out = std::io::BufWriter::new(file);
    let versions = study_versions(conn, study.id)?;
    let version_values: Vec<Value> = versions
        .values()
        .map(|v| {
            json!({
                "version": v.row.version,
                "label": v.row.label,
                "protocol_sha256": v.row.protocol_sha256,
                "imported_at": timestamp(&v.row.imported_at),
                "protocol_text": v.row.protocol_text,
                // In the protocol's order (the arms map is keyed by database id).
                "arms": v.protocol.arms.iter().map(|a| &a.id).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut ledger = Vec::new();
    for (id, v) in &versions {
        for a in db::assignments::list_for_version(conn, *id)? {
            ledger.push(json!({
                "study_version": v.row.version,
                "draw_index": a.draw_index,
                "participant": db::participants::get(conn, a.participant_id)?.pseudonym,
                "method": a.method,
                "arm": v.arms.get(&a.arm_id),
                "task": a.task_id,
                "topic": a.topic_id,
                "created_at": timestamp(&a.created_at),
                "inputs": serde_json::from_str::<Value>(&a.inputs_json).unwrap_or(Value::Null),
            }));
        }
    }
    let head = json!({
        "format": FORMAT,
        "exported_at": timestamp(&db::now()),
        "study": {"slug": study.slug, "title": study.title, "status": study.status},
        "versions": version_values,
        "assignments": ledger,
    });
    // The head's fields, then the sessions streamed into the same object.
    let head = serde_json::to_string(&head).expect("values serialise");
    write!(out, "{},\"sessions\":[", &head[..head.len() - 1]).map_err(write_err)?;
    let ids: Vec<i64> = versions.keys().copied().collect();
    let mut count = 0u64;
    for_each_session(conn, &ids, |conn, s| {
        let version = &versions[&s.study_version_id];
        let participant = db::participants::get(conn, s.participant_id)?;
        let session = json!({
            "session": s.public_id,
            "participant": participant.pseudonym,
            "simulated": participant.simulated,
            "study_version": version.row.version,
            "arm": s.arm_id.and_then(|a| version.arms.get(&a)),
            "task": s.task_id,
            "topic": s.topic_id,
            "state": s.state,
            "outcome": s.outcome,
            "completion_code": s.completion_code,
            "consent_sha256": s.consent_sha256,
            "started_at": timestamp(&s.started_at),
            "consented_at": s.consented_at.as_ref().map(timestamp),
            "first_message_at": s.first_message_at.as_ref().map(timestamp),
            "finished_at": s.finished_at.as_ref().map(timestamp),
            "last_activity_at": timestamp(&s.last_activity_at),
            "messages": db::messages::list_for_session(conn, s.id)?.into_iter().map(|m| json!({
                "seq": m.seq, "role": m.role, "content": m.content, "created_at": timestamp(&m.created_at),
                "ttft_ms": m.ttft_ms, "gen_ms": m.gen_ms, "prompt_tokens": m.prompt_tokens,
                "gen_tokens": m.gen_tokens, "finish_reason": m.finish_reason,
                "policy": m.policy_json.and_then(|p| serde_json::from_str::<Value>(&p).ok()),
            })).collect::<Vec<_>>(),
            "revisions": db::revisions::list_for_session(conn, s.id)?.into_iter().map(|r| json!({
                "rev": r.rev, "author": r.author, "inserted_message": r.message_seq,
                "created_at": timestamp(&r.created_at), "content": r.content,
            })).collect::<Vec<_>>(),
            "ratings": db::ratings::list_for_session(conn, s.id)?.into_iter().map(|r| json!({
                "after_turn": r.after_turn, "key": r.rating_key, "value": r.value,
                "created_at": timestamp(&r.created_at),
            })).collect::<Vec<_>>(),
            "answers": db::answers::list_for_session(conn, s.id)?.into_iter().map(|a| json!({
                "key": a.question_key, "answer": a.answer, "created_at": timestamp(&a.created_at),
            })).collect::<Vec<_>>(),
            "candidates": db::candidates::list_for_session(conn, s.id)?.into_iter().map(|c| json!({
                "after_seq": c.after_seq, "source": c.source, "chosen": c.chosen,
                "created_at": timestamp(&c.created_at), "content": c.content,
                "policy": serde_json::from_str::<Value>(&c.policy_json).unwrap_or(Value::Null),
            })).collect::<Vec<_>>(),
            "events": db::events::list_for_session(conn, s.id)?.into_iter().map(|e| json!({
                "client_seq": e.client_seq, "kind": e.kind, "created_at": timestamp(&e.created_at),
                "data": serde_json::from_str::<Value>(&e.payload_json).unwrap_or(Value::Null),
            })).collect::<Vec<_>>(),
        });
        if count > 0 {
            out.write_all(b",").map_err(write_err)?;
        }
        serde_json::to_writer(&mut out, &session).map_err(|e| write_err(e.into()))?;
        count += 1;
        progress(count);
        Ok(())
    })?;
    out.write_all(b"]}\n").map_err(write_err)?;
    out.flush().map_err(write_err)?;
    Ok(count)
}
