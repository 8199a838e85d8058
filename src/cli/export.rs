//! `export`: a study's data as CSV tables, as preference pairs, or as one JSON document.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use indicatif::ProgressBar;

use collabllm::export;

use super::{Context, Progress, SessionsArg};

#[derive(Subcommand)]
pub enum ExportCommand {
    /// CSV tables (sessions wide; messages, ratings, revisions, events, assignments long) and a
    /// codebook, into a directory.
    Csv {
        /// Study slug.
        #[arg(long)]
        study: String,
        /// Directory to write the files into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Only sessions of this arm.
        #[arg(long)]
        arm: Option<String>,
        /// Only sessions started on or after this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Only sessions started on or before this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// Only sessions that were completed.
        #[arg(long)]
        completed_only: bool,
        /// Which participants' sessions: people, simulated ones, or all.
        #[arg(long, value_enum, default_value_t = SessionsArg::All)]
        sessions: SessionsArg,
    },
    /// Preference pairs from the participants' own signals, as JSONL for TRL's DPOTrainer
    /// (`train.jsonl`, `eval.jsonl`; ties as KTO rows in `kto_train.jsonl`, `kto_eval.jsonl`; split
    /// by participant). Sources: the picks of comparison turns and regenerated replies, and assistant replies inserted into
    /// the document and then rewritten (chosen: the participant's version).
    Pairs {
        /// Study slug.
        #[arg(long)]
        study: String,
        /// Directory to write `train.jsonl` and `eval.jsonl` into.
        #[arg(long)]
        out: PathBuf,
        /// Share of an inserted reply that must have changed for a pair (0–1).
        #[arg(long, default_value_t = export::pairs::DEFAULT_EDIT_THRESHOLD)]
        edit_threshold: f64,
        /// Share of participants whose pairs go to eval.jsonl (0–1).
        #[arg(long, default_value_t = 0.1)]
        eval_share: f64,
    },
    /// The whole study as one JSON document (protocol versions, sessions with everything
    /// recorded, the assignment ledger), for archiving and re-analysis.
    Json {
        /// Study slug.
        #[arg(long)]
        study: String,
        /// File to write.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn export(ctx: &Context, command: ExportCommand) -> Result<()> {
    match command {
        ExportCommand::Csv {
            study,
            out,
            arm,
            from,
            to,
            completed_only,
            sessions,
        } => {
            let filter = export::Filter {
                arm,
                from,
                to,
                completed_only,
                simulated: match sessions {
                    SessionsArg::Human => Some(false),
                    SessionsArg::Simulated => Some(true),
                    SessionsArg::All => None,
                },
            };
            let mut conn = ctx.conn()?;
            let bar = Progress::new("exporting sessions");
            let written = export::csv::export(&mut conn, &study, &filter, &out, &bar.counter());
            bar.finish();
            for (file, rows) in written?.files {
                println!("{} ({rows} rows)", out.join(file).display());
            }
            Ok(())
        }
        ExportCommand::Pairs {
            study,
            out,
            edit_threshold,
            eval_share,
        } => {
            if !(0.0..=1.0).contains(&edit_threshold) || !(0.0..=1.0).contains(&eval_share) {
                bail!("--edit-threshold and --eval-share are shares between 0 and 1");
            }
            let options = export::pairs::PairOptions {
                edit_threshold,
                eval_share,
            };
            let counts = export::pairs::export(&mut ctx.conn()?, &study, &options, &out)?;
            println!(
                "{}: {} DPO pairs in train.jsonl, {} in eval.jsonl; {} KTO rows in kto_train.jsonl, {} in kto_eval.jsonl",
                out.display(),
                counts.train,
                counts.eval,
                counts.kto_train,
                counts.kto_eval
            );
            Ok(())
        }
        ExportCommand::Json { study, out } => {
            let mut conn = ctx.conn()?;
            let bar = ProgressBar::new_spinner().with_message("sessions exported");
            let count = export::json::export(&mut conn, &study, &out, &|n| bar.set_position(n))?;
            bar.finish_and_clear();
            println!("{} ({count} sessions)", out.display());
            Ok(())
        }
    }
}
