//! Limits on what one client can make the server do at the HTTP edge: new sessions per address,
//! failed console logins per name and per address. Counted in memory per node.

use std::time::Duration;

use crate::throttle::Throttle;

/// The limits of a server.
pub struct Limits {
    /// New participant sessions per client address.
    pub new_sessions: Throttle,
    /// Failed console logins per researcher name.
    pub logins_by_name: Throttle,
    /// Failed console logins per client address.
    pub logins_by_address: Throttle,
    /// Take the client's address from `X-Forwarded-For` (behind a reverse proxy).
    pub trust_forwarded_for: bool,
}

/// Failed logins a name may have in [`LOGIN_WINDOW`], and an address.
const LOGINS_PER_NAME: usize = 5;
const LOGINS_PER_ADDRESS: usize = 20;
const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);

impl Limits {
    pub fn new(new_sessions_per_hour: usize, trust_forwarded_for: bool) -> Self {
        Self {
            new_sessions: Throttle::new(new_sessions_per_hour, Duration::from_secs(3600)),
            logins_by_name: Throttle::new(LOGINS_PER_NAME, LOGIN_WINDOW),
            logins_by_address: Throttle::new(LOGINS_PER_ADDRESS, LOGIN_WINDOW),
            trust_forwarded_for,
        }
    }

    /// The client's address, as the key of per-address limits (never stored).
    pub fn address(&self, req: &actix_web::HttpRequest) -> String {
        let info = req.connection_info();
        let address = if self.trust_forwarded_for {
            info.realip_remote_addr()
        } else {
            info.peer_addr()
        };
        address.unwrap_or("unknown").to_string()
    }
}

/// New sessions one address may start per hour by default: a household or a lab room shares an
/// address, a script does not get far.
pub const DEFAULT_NEW_SESSIONS_PER_HOUR: usize = 20;

impl Default for Limits {
    fn default() -> Self {
        Self::new(DEFAULT_NEW_SESSIONS_PER_HOUR, false)
    }
}

/// "in N minutes" for a wait.
pub fn minutes(wait: Duration) -> String {
    let m = wait.as_secs().div_ceil(60).max(1);
    if m == 1 {
        "in a minute".into()
    } else {
        format!("in {m} minutes")
    }
}
