//! A client of the participant protocol, speaking it as the browser's page does: the study link
//! and consent over HTTP (keeping the session cookie), then frames over the websocket. Simulated
//! pilots (`collab::simulate`), `bench load` and the test suite all drive sessions through it, so
//! the protocol has one client besides the page.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::frames::{ClientFrame, ServerFrame, StateView};
use super::SESSION_COOKIE;

type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{what} answered {status}")]
    Status { what: String, status: u16 },
    #[error("cannot send a frame: {0}")]
    Send(String),
    #[error("the server sent nothing for {0:?}")]
    Timeout(Duration),
    /// The close frame's code and reason, if it sent one.
    #[error("the server closed the connection{}", .0.as_ref().map(|(code, reason)| format!(" ({code}: {reason})")).unwrap_or_default())]
    Closed(Option<(u16, String)>),
    #[error("websocket error: {0}")]
    Socket(String),
    #[error("an unreadable frame ({reason}): {text}")]
    Unreadable { reason: String, text: String },
    #[error("the server refused {what}: {code}: {message}")]
    Refused {
        what: String,
        code: String,
        message: String,
    },
}

/// The HTTP side of a participant: the study link and consent, with the session cookie kept as a
/// browser keeps it.
pub struct Browser {
    base: String,
    pub http: reqwest::Client,
    /// The session cookie's value, once the study link set one.
    pub token: Option<String>,
}

impl Browser {
    /// A browser of the server at `base` (`http://host:port`).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client without TLS settings builds"),
            token: None,
        }
    }

    /// The `cookie` header a request of this browser carries.
    pub fn cookie(&self) -> String {
        session_cookie(self.token.as_deref().unwrap_or_default())
    }

    /// Opens the study link with these query parameters (e.g. `PROLIFIC_PID=…`); keeps the
    /// session cookie it sets.
    pub async fn enter(
        &mut self,
        slug: &str,
        query: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let url = if query.is_empty() {
            format!("{}/s/{slug}", self.base)
        } else {
            format!("{}/s/{slug}?{query}", self.base)
        };
        let response = self
            .http
            .get(&url)
            .header("cookie", self.cookie())
            .send()
            .await
            .map_err(|e| connect(&url, e))?;
        let set = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                v.split(';')
                    .next()?
                    .strip_prefix(&format!("{SESSION_COOKIE}="))
                    .map(str::to_string)
            });
        if set.is_some() {
            self.token = set;
        }
        Ok(response)
    }

    /// The participant's page.
    pub async fn page(&self, slug: &str) -> Result<String, ClientError> {
        let url = format!("{}/s/{slug}/p", self.base);
        let response = self
            .http
            .get(&url)
            .header("cookie", self.cookie())
            .send()
            .await
            .map_err(|e| connect(&url, e))?;
        response.text().await.map_err(|e| connect(&url, e))
    }

    /// Answers the consent form with `decision` (`agree` or `decline`).
    pub async fn consent(
        &self,
        slug: &str,
        decision: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}/s/{slug}/consent", self.base);
        self.http
            .post(&url)
            .header("cookie", self.cookie())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("decision={decision}"))
            .send()
            .await
            .map_err(|e| connect(&url, e))
    }

    /// Enters the study and agrees to the consent form, as a participant who takes part does.
    pub async fn join(&mut self, slug: &str, query: &str) -> Result<(), ClientError> {
        let entry = self.enter(slug, query).await?;
        if self.token.is_none() {
            return Err(ClientError::Status {
                what: format!("the study link of {slug} (setting no session)"),
                status: entry.status().as_u16(),
            });
        }
        let consent = self.consent(slug, "agree").await?;
        if !consent.status().is_redirection() {
            return Err(ClientError::Status {
                what: "the consent form".into(),
                status: consent.status().as_u16(),
            });
        }
        Ok(())
    }

    /// Opens the websocket of the study `slug` with this browser's cookie.
    pub async fn connect(&self, slug: &str, timeout: Duration) -> Result<Connection, ClientError> {
        let url = format!("{}/s/{slug}/ws", self.base.replacen("http", "ws", 1));
        Connection::open(&url, Some(&self.cookie()), timeout).await
    }
}

/// The `cookie` header of a browser in the session of this token.
pub fn session_cookie(token: &str) -> String {
    format!("{SESSION_COOKIE}={token}")
}

fn connect(url: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Connect {
        url: url.to_string(),
        reason: e.to_string(),
    }
}

/// One websocket connection of a session: typed frames out, typed frames in, and the next client
/// sequence number. Frames a caller read past while waiting for another can be put back with
/// [`Connection::keep`] for a later [`Connection::next`].
pub struct Connection {
    socket: WebSocket,
    /// The client sequence number last used.
    pub seq: i64,
    backlog: VecDeque<ServerFrame>,
    timeout: Duration,
    retry: Retry,
    /// Frames sent again after a refusal that `retry` covers.
    pub retried: u64,
}

/// Which refusals a connection answers by sending the frame again, how long it waits first and
/// how often it tries before the refusal is the caller's.
struct Retry {
    codes: &'static [&'static str],
    pause: Duration,
    attempts: u32,
}

impl Connection {
    /// Connects to the websocket at `url` (`ws://host:port/s/<slug>/ws`) with this `cookie`
    /// header (see [`session_cookie`]); waits at most `timeout` for any one frame afterwards.
    pub async fn open(
        url: &str,
        cookie: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let mut request = url.into_client_request().map_err(|e| connect(url, e))?;
        if let Some(cookie) = cookie {
            request
                .headers_mut()
                .insert("cookie", cookie.parse().map_err(|e| connect(url, e))?);
        }
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| connect(url, e))?;
        Ok(Self {
            socket,
            seq: 0,
            backlog: VecDeque::new(),
            timeout,
            retry: Retry {
                codes: &[],
                pause: Duration::ZERO,
                attempts: 0,
            },
            retried: 0,
        })
    }

    /// Sends a frame again, after `pause`, up to `attempts` times, when the server refuses it
    /// with one of `codes`: `rate_limited`, or `unavailable` (the database could not store it,
    /// so nothing of it was kept).
    pub fn retrying(
        mut self,
        codes: &'static [&'static str],
        pause: Duration,
        attempts: u32,
    ) -> Self {
        self.retry = Retry {
            codes,
            pause,
            attempts,
        };
        self
    }

    /// The next client sequence number.
    pub fn next_seq(&mut self) -> i64 {
        self.seq += 1;
        self.seq
    }

    /// Sends a websocket message as it is (for tests of what the server does with frames it
    /// cannot read).
    pub async fn send_raw(&mut self, message: Message) -> Result<(), ClientError> {
        self.socket
            .send(message)
            .await
            .map_err(|e| ClientError::Send(e.to_string()))
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let text = serde_json::to_string(frame).expect("client frames serialise");
        self.send_raw(Message::text(text)).await
    }

    /// The next frame from the server (a kept one first).
    pub async fn next(&mut self) -> Result<ServerFrame, ClientError> {
        if let Some(frame) = self.backlog.pop_front() {
            return Ok(frame);
        }
        loop {
            let message = tokio::time::timeout(self.timeout, self.socket.next())
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text).map_err(|e| ClientError::Unreadable {
                        reason: e.to_string(),
                        text: text.to_string(),
                    })
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Closed(
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    ))
                }
                None => return Err(ClientError::Closed(None)),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ClientError::Socket(e.to_string())),
            }
        }
    }

    /// Puts frames back to be read again by [`Connection::next`], in order.
    pub fn keep(&mut self, frames: impl IntoIterator<Item = ServerFrame>) {
        self.backlog.extend(frames);
    }

    /// Frames until one is `wanted`; returns it and those before it.
    pub async fn until(
        &mut self,
        wanted: impl Fn(&ServerFrame) -> bool,
    ) -> Result<(ServerFrame, Vec<ServerFrame>), ClientError> {
        let mut before = Vec::new();
        loop {
            let frame = self.next().await?;
            if wanted(&frame) {
                return Ok((frame, before));
            }
            before.push(frame);
        }
    }

    /// `hello`, and the session's full state in answer, as a (re)connecting page gets it.
    pub async fn state(&mut self) -> Result<StateView, ClientError> {
        let (frame, _) = self
            .request(
                ClientFrame::Hello {
                    session_token: None,
                },
                |f| matches!(f, ServerFrame::State(_)),
            )
            .await?;
        match frame {
            ServerFrame::State(state) => Ok(*state),
            _ => unreachable!("matched a state"),
        }
    }

    /// Sends a frame and reads until `done` says so; returns that frame and those before it. An
    /// error frame about this frame (or, for `hello`, about the connection) is a refusal, sent
    /// again if the connection retries its code.
    pub async fn request(
        &mut self,
        frame: ClientFrame,
        done: impl Fn(&ServerFrame) -> bool,
    ) -> Result<(ServerFrame, Vec<ServerFrame>), ClientError> {
        let seq = frame.client_seq();
        self.send(&frame).await?;
        let mut before = Vec::new();
        let mut attempts = 0;
        loop {
            let reply = self.next().await?;
            if let ServerFrame::Error {
                code,
                message,
                client_seq,
            } = &reply
            {
                if *client_seq == seq {
                    if self.retry.codes.contains(&code.as_str()) && attempts < self.retry.attempts {
                        attempts += 1;
                        self.retried += 1;
                        tokio::time::sleep(self.retry.pause).await;
                        self.send(&frame).await?;
                        continue;
                    }
                    return Err(ClientError::Refused {
                        what: frame.kind().to_string(),
                        code: code.clone(),
                        message: message.clone(),
                    });
                }
            }
            if done(&reply) {
                return Ok((reply, before));
            }
            before.push(reply);
        }
    }

    /// Sends a frame numbered by `frame(seq)` with the next sequence number and waits for its
    /// acknowledgement; returns the revision a document save made and the frames before the
    /// acknowledgement.
    pub async fn acked(
        &mut self,
        frame: impl FnOnce(i64) -> ClientFrame,
    ) -> Result<(Option<i32>, Vec<ServerFrame>), ClientError> {
        let seq = self.next_seq();
        let (ack, before) = self
            .request(
                frame(seq),
                |f| matches!(f, ServerFrame::Ack { client_seq, .. } if *client_seq == seq),
            )
            .await?;
        let ServerFrame::Ack { rev, .. } = ack else {
            unreachable!("matched an ack")
        };
        Ok((rev, before))
    }

    /// Closes the connection as a page that is left does.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}
