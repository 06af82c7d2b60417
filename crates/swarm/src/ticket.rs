//! Join tickets: everything a volunteer needs to reach a run, in one string.
//!
//! A ticket names the run, the coordinator's key (so the volunteer can tell
//! the real host from an impostor: QUIC connections are authenticated by
//! that key) and the addresses to dial. It is plain text that survives a chat
//! message or a `starling://join/<ticket>` link: a prefix that says what it
//! is, then lowercase base32 without padding.

use std::{fmt, net::SocketAddr, str::FromStr};

use iroh::EndpointId;
use serde::{Deserialize, Serialize};

use crate::message::RunId;

const PREFIX: &str = "starling1";
/// Longest ticket string we parse (keeps hostile input cheap).
const MAX_TICKET_CHARS: usize = 4096;

/// What a volunteer needs to join a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The run.
    pub run_id: RunId,
    /// The coordinator's endpoint id.
    pub host: EndpointId,
    /// Direct addresses of the coordinator.
    pub addrs: Vec<SocketAddr>,
}

/// Why a ticket string was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// It does not start with `starling1`.
    #[error("not a Starling ticket (it should start with \"{PREFIX}\")")]
    Prefix,
    /// Too long to be a ticket.
    #[error("ticket is too long ({0} characters)")]
    TooLong(usize),
    /// The base32 text is damaged (a character was lost in copying?).
    #[error("ticket is damaged: {0}")]
    Encoding(#[from] data_encoding::DecodeError),
    /// The decoded bytes are not a ticket.
    #[error("ticket is damaged: {0}")]
    Malformed(#[from] postcard::Error),
    /// No address to dial.
    #[error("ticket has no address to connect to")]
    NoAddress,
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = postcard::to_stdvec(self).map_err(|_| fmt::Error)?;
        write!(
            f,
            "{PREFIX}{}",
            data_encoding::BASE32_NOPAD
                .encode(&bytes)
                .to_ascii_lowercase()
        )
    }
}

impl FromStr for Ticket {
    type Err = TicketError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let s = s.strip_prefix("starling://join/").unwrap_or(s);
        if s.len() > MAX_TICKET_CHARS {
            return Err(TicketError::TooLong(s.len()));
        }
        let body = s.strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let bytes = data_encoding::BASE32_NOPAD.decode(body.to_ascii_uppercase().as_bytes())?;
        let ticket: Ticket = postcard::from_bytes(&bytes)?;
        if ticket.addrs.is_empty() {
            return Err(TicketError::NoAddress);
        }
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iroh::SecretKey;
    use proptest::prelude::*;

    fn ticket() -> Ticket {
        Ticket {
            run_id: RunId([9; 16]),
            host: SecretKey::from_bytes(&[1; 32]).public(),
            addrs: vec![
                "127.0.0.1:4433".parse().unwrap(),
                "[::1]:5000".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn round_trips_and_accepts_links() {
        let t = ticket();
        let s = t.to_string();
        assert!(s.starts_with("starling1"));
        assert!(s.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(s.parse::<Ticket>().unwrap(), t);
        assert_eq!(
            format!(" starling://join/{s}\n").parse::<Ticket>().unwrap(),
            t
        );
    }

    #[test]
    fn damaged_tickets_say_so() {
        let s = ticket().to_string();
        assert!(matches!(
            "hello".parse::<Ticket>(),
            Err(TicketError::Prefix)
        ));
        assert!(s[..s.len() - 7].parse::<Ticket>().is_err());
        let no_addr = Ticket {
            addrs: vec![],
            ..ticket()
        }
        .to_string();
        assert!(matches!(
            no_addr.parse::<Ticket>(),
            Err(TicketError::NoAddress)
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "starling1[a-z2-7]{0,200}") {
            let _ = s.parse::<Ticket>();
        }
    }
}
