//! The event feed's cursors and the one rule for checking them, shared by both backends. A cursor
//! is a stream id, `milliseconds-sequence`, as Redis writes them.

use crate::domain::ports::FeedError;

/// A feed position.
pub type Id = (u64, u64);

pub fn format_cursor(id: Id) -> String {
    format!("{}-{}", id.0, id.1)
}

pub fn parse_cursor(cursor: &str) -> Option<Id> {
    let (ms, seq) = cursor.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// What a reader's cursor is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Whether events were ever trimmed away (retention).
    pub trimmed: bool,
    /// The oldest event still held, if any.
    pub oldest_held: Option<Id>,
    /// The newest id the feed gave out ((0, 0) before the first).
    pub newest: Id,
}

impl Bounds {
    /// The position of `cursor`, unless reading on from it would silently skip events: once some
    /// were trimmed, a cursor before the oldest event held has missed them (a cursor exactly on
    /// the newest trimmed one is refused too: Redis does not record which that was); a cursor
    /// beyond the newest was never given out by this feed.
    pub fn check(&self, cursor: &str) -> Result<Id, FeedError> {
        let id = parse_cursor(cursor).ok_or_else(|| FeedError::Malformed(cursor.to_owned()))?;
        let oldest_kept = self
            .oldest_held
            .unwrap_or((self.newest.0, self.newest.1 + 1));
        if self.trimmed && id < oldest_kept {
            return Err(FeedError::Expired(cursor.to_owned()));
        }
        if id > self.newest {
            return Err(FeedError::Malformed(cursor.to_owned()));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor(&format_cursor((17, 3))), Some((17, 3)));
        assert_eq!(parse_cursor("17"), None);
        assert_eq!(parse_cursor("-1-1"), None);
    }

    #[test]
    fn a_cursor_is_checked_against_the_feed() {
        let untrimmed = Bounds {
            trimmed: false,
            oldest_held: Some((10, 0)),
            newest: (30, 0),
        };
        assert_eq!(untrimmed.check("5-0").unwrap(), (5, 0));
        assert_eq!(untrimmed.check("30-0").unwrap(), (30, 0));
        assert!(matches!(
            untrimmed.check("31-0"),
            Err(FeedError::Malformed(_))
        ));
        assert!(matches!(untrimmed.check("x"), Err(FeedError::Malformed(_))));
        let trimmed = Bounds {
            trimmed: true,
            ..untrimmed
        };
        assert!(matches!(trimmed.check("9-5"), Err(FeedError::Expired(_))));
        assert_eq!(trimmed.check("10-0").unwrap(), (10, 0));
        let emptied = Bounds {
            trimmed: true,
            oldest_held: None,
            newest: (30, 0),
        };
        // Everything trimmed: even the newest id may have been trimmed unseen.
        assert!(matches!(emptied.check("30-0"), Err(FeedError::Expired(_))));
        assert!(matches!(emptied.check("29-0"), Err(FeedError::Expired(_))));
    }
}
