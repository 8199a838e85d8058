// The tables of both backends; the migrations in `migrations/sqlite` and `migrations/postgres` create them.

diesel::table! {
    researchers (id) {
        id -> BigInt,
        name -> Text,
        password_hash -> Text,
        created_at -> Timestamp,
        sessions_valid_after -> Nullable<Timestamp>,
    }
}

diesel::table! {
    evaluations (id) {
        id -> BigInt,
        study_id -> BigInt,
        users -> Integer,
        table_json -> Text,
        provenance_json -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    leases (name) {
        name -> Text,
        holder -> Text,
        expires_at -> Timestamp,
        session_id -> Nullable<BigInt>,
        progress -> Nullable<Text>,
        cancel -> Bool,
    }
}

diesel::table! {
    synth_turns (id) {
        id -> BigInt,
        key_sha256 -> Text,
        conversation -> Text,
        turn -> Integer,
        result_json -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    api_keys (id) {
        id -> BigInt,
        name -> Text,
        key_sha256 -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    audit_events (id) {
        id -> BigInt,
        session_id -> BigInt,
        kind -> Text,
        detail_json -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    secrets (name) {
        name -> Text,
        value -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    studies (id) {
        id -> BigInt,
        slug -> Text,
        title -> Text,
        status -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    study_versions (id) {
        id -> BigInt,
        study_id -> BigInt,
        version -> Integer,
        label -> Text,
        protocol_text -> Text,
        protocol_sha256 -> Text,
        source_path -> Text,
        imported_at -> Timestamp,
    }
}

diesel::table! {
    arms (id) {
        id -> BigInt,
        study_version_id -> BigInt,
        name -> Text,
        model_id -> Text,
        weight -> Double,
        quota -> Nullable<Integer>,
        policy_json -> Text,
    }
}

diesel::table! {
    participants (id) {
        id -> BigInt,
        study_id -> BigInt,
        pseudonym -> Text,
        external_id_hmac -> Nullable<Text>,
        simulated -> Bool,
        created_at -> Timestamp,
    }
}

diesel::table! {
    sessions (id) {
        id -> BigInt,
        public_id -> Text,
        participant_id -> BigInt,
        study_version_id -> BigInt,
        arm_id -> Nullable<BigInt>,
        task_id -> Nullable<Text>,
        topic_id -> Nullable<Text>,
        token_hash -> Text,
        state -> Text,
        outcome -> Nullable<Text>,
        completion_code -> Nullable<Text>,
        consent_sha256 -> Nullable<Text>,
        consented_at -> Nullable<Timestamp>,
        started_at -> Timestamp,
        first_message_at -> Nullable<Timestamp>,
        finished_at -> Nullable<Timestamp>,
        last_activity_at -> Timestamp,
        last_client_seq -> BigInt,
        resume_proof_hmac -> Nullable<Text>,
        handover_allowed -> Bool,
        owner_epoch -> BigInt,
        simulation_seed -> Nullable<BigInt>,
    }
}

diesel::table! {
    messages (id) {
        id -> BigInt,
        session_id -> BigInt,
        seq -> Integer,
        role -> Text,
        content -> Text,
        created_at -> Timestamp,
        ttft_ms -> Nullable<Integer>,
        gen_ms -> Nullable<Integer>,
        prompt_tokens -> Nullable<Integer>,
        gen_tokens -> Nullable<Integer>,
        finish_reason -> Nullable<Text>,
        policy_json -> Nullable<Text>,
    }
}

diesel::table! {
    candidates (id) {
        id -> BigInt,
        session_id -> BigInt,
        after_seq -> Integer,
        source -> Text,
        content -> Text,
        chosen -> Nullable<Bool>,
        policy_json -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    document_revisions (id) {
        id -> BigInt,
        session_id -> BigInt,
        rev -> Integer,
        author -> Text,
        message_seq -> Nullable<Integer>,
        content -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    ratings (id) {
        id -> BigInt,
        session_id -> BigInt,
        after_turn -> Integer,
        rating_key -> Text,
        value -> Integer,
        created_at -> Timestamp,
    }
}

diesel::table! {
    questionnaire_answers (id) {
        id -> BigInt,
        session_id -> BigInt,
        question_key -> Text,
        answer -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    events (id) {
        id -> BigInt,
        session_id -> BigInt,
        client_seq -> BigInt,
        kind -> Text,
        payload_json -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    assignments (id) {
        id -> BigInt,
        study_version_id -> BigInt,
        participant_id -> BigInt,
        draw_index -> Integer,
        method -> Text,
        arm_id -> BigInt,
        task_id -> Text,
        topic_id -> Text,
        inputs_json -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    rewards (id) {
        id -> BigInt,
        session_id -> BigInt,
        turn -> Integer,
        candidate_id -> Nullable<BigInt>,
        mr -> Double,
        mr_std -> Double,
        components_json -> Text,
        created_at -> Timestamp,
        config_sha256 -> Text,
    }
}

diesel::table! {
    rollouts (id) {
        id -> BigInt,
        session_id -> BigInt,
        turn -> Integer,
        candidate_id -> Nullable<BigInt>,
        sample -> Integer,
        config_sha256 -> Text,
        seed -> BigInt,
        conversation_json -> Text,
        metrics_json -> Text,
        score -> Double,
        created_at -> Timestamp,
    }
}

diesel::joinable!(study_versions -> studies (study_id));
diesel::joinable!(arms -> study_versions (study_version_id));
diesel::joinable!(participants -> studies (study_id));
diesel::joinable!(sessions -> participants (participant_id));
diesel::joinable!(sessions -> study_versions (study_version_id));
diesel::joinable!(sessions -> arms (arm_id));
diesel::joinable!(messages -> sessions (session_id));
diesel::joinable!(audit_events -> sessions (session_id));
diesel::joinable!(candidates -> sessions (session_id));
diesel::joinable!(document_revisions -> sessions (session_id));
diesel::joinable!(ratings -> sessions (session_id));
diesel::joinable!(questionnaire_answers -> sessions (session_id));
diesel::joinable!(events -> sessions (session_id));
diesel::joinable!(assignments -> study_versions (study_version_id));
diesel::joinable!(assignments -> participants (participant_id));
diesel::joinable!(assignments -> arms (arm_id));
diesel::joinable!(rewards -> sessions (session_id));
diesel::joinable!(rewards -> candidates (candidate_id));
diesel::joinable!(rollouts -> sessions (session_id));
diesel::joinable!(rollouts -> candidates (candidate_id));
diesel::joinable!(evaluations -> studies (study_id));

diesel::allow_tables_to_appear_in_same_query!(
    api_keys,
    audit_events,
    researchers,
    secrets,
    studies,
    study_versions,
    arms,
    participants,
    sessions,
    messages,
    candidates,
    document_revisions,
    ratings,
    questionnaire_answers,
    events,
    assignments,
    rewards,
    rollouts,
    evaluations,
    synth_turns,
    leases,
);
