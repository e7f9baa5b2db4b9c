//! CSI paging (`max_entries`, `starting_token`, `next_token`) over the block-storage API's
//! pages.
//!
//! A CSI page may end inside an API page, so a CSI token is the API token of the page it
//! starts in plus how many entries of that page were already returned, hex-encoded behind a
//! version prefix. A token that does not decode is refused with ABORTED, as the CSI spec asks.

use std::future::Future;

const PREFIX: &str = "bg1-";
/// The most entries asked of the API in one call.
const MAX_API_PAGE: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("starting_token {0:?} was not issued by this plugin")]
pub struct InvalidToken(pub String);

/// Where a CSI page starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The API's page token; empty is the first page.
    pub api_token: String,
    /// Entries of that API page already returned.
    pub skip: usize,
}

impl Cursor {
    pub fn decode(token: &str) -> Result<Cursor, InvalidToken> {
        if token.is_empty() {
            return Ok(Cursor::default());
        }
        let invalid = || InvalidToken(token.to_owned());
        let hex = token.strip_prefix(PREFIX).ok_or_else(invalid)?;
        let bytes = decode_hex(hex).ok_or_else(invalid)?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let (skip, api_token) = text.split_once('.').ok_or_else(invalid)?;
        let skip = skip.parse().map_err(|_| invalid())?;
        Ok(Cursor {
            api_token: api_token.to_owned(),
            skip,
        })
    }

    pub fn encode(&self) -> String {
        let text = format!("{}.{}", self.skip, self.api_token);
        let mut token = String::with_capacity(PREFIX.len() + 2 * text.len());
        token.push_str(PREFIX);
        for byte in text.bytes() {
            token.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
            token.push(char::from(b"0123456789abcdef"[usize::from(byte & 0x0f)]));
        }
        token
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    hex.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// One page of the API: its entries and its next token (empty at the end).
pub type ApiPage<T> = (Vec<T>, String);

/// Collects one CSI page of at most `max_entries` (zero: one API page's worth) starting at
/// `cursor`, calling `fetch(page_size, api_token)` for API pages; returns the entries and
/// the CSI `next_token` (empty when the listing is complete).
pub async fn collect<T, E, F, Fut>(
    cursor: Cursor,
    max_entries: usize,
    mut fetch: F,
) -> Result<(Vec<T>, String), E>
where
    F: FnMut(u32, String) -> Fut,
    Fut: Future<Output = Result<ApiPage<T>, E>>,
{
    let mut entries = Vec::new();
    let mut cursor = cursor;
    loop {
        let page_size = if max_entries == 0 {
            0
        } else {
            (max_entries - entries.len() + cursor.skip).min(MAX_API_PAGE)
        };
        let page_size = u32::try_from(page_size).unwrap_or(u32::MAX);
        let (page, next_api_token) = fetch(page_size, cursor.api_token.clone()).await?;
        for (index, entry) in page.into_iter().enumerate().skip(cursor.skip) {
            if max_entries != 0 && entries.len() == max_entries {
                let next = Cursor {
                    api_token: cursor.api_token,
                    skip: index,
                };
                return Ok((entries, next.encode()));
            }
            entries.push(entry);
        }
        if next_api_token.is_empty() {
            return Ok((entries, String::new()));
        }
        cursor = Cursor {
            api_token: next_api_token,
            skip: 0,
        };
        if max_entries == 0 || entries.len() == max_entries {
            return Ok((entries, cursor.encode()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_tokens_are_refused() {
        for cursor in [
            Cursor::default(),
            Cursor {
                api_token: "vol-17".into(),
                skip: 3,
            },
            Cursor {
                api_token: "with.dots.and ünïcode".into(),
                skip: 0,
            },
        ] {
            assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
        }
        assert_eq!(Cursor::decode(""), Ok(Cursor::default()));
        for bad in ["garbage", "bg1-zz", "bg1-abc", "bg1-", "bg1-2e"] {
            assert_eq!(Cursor::decode(bad), Err(InvalidToken(bad.into())), "{bad}");
        }
    }

    /// A fake API listing 0..n in pages of at most `api_max`, with tokens "after <last>".
    async fn list(n: u32, api_max: u32, page_size: u32, token: String) -> Result<ApiPage<u32>, ()> {
        let start = if token.is_empty() {
            0
        } else {
            token
                .trim_start_matches("after ")
                .parse::<u32>()
                .map_err(|_| ())?
                + 1
        };
        let size = if page_size == 0 {
            api_max
        } else {
            page_size.min(api_max)
        };
        let end = (start + size).min(n);
        let next = if end < n {
            format!("after {}", end - 1)
        } else {
            String::new()
        };
        Ok(((start..end).collect(), next))
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[test]
    fn pages_cover_every_entry_exactly_once() {
        for (n, api_max, max_entries) in [
            (10, 3, 4),
            (10, 100, 3),
            (9, 3, 3),
            (7, 2, 1),
            (0, 5, 2),
            (5, 5, 5),
        ] {
            let mut seen = Vec::new();
            let mut token = String::new();
            let mut pages = 0;
            loop {
                let (entries, next) = block_on(collect(
                    Cursor::decode(&token).expect("our token"),
                    max_entries,
                    |size, api| list(n, api_max, size, api),
                ))
                .expect("fake never fails");
                assert!(entries.len() <= max_entries);
                seen.extend(entries);
                pages += 1;
                assert!(pages < 100, "paging does not end");
                if next.is_empty() {
                    break;
                }
                token = next;
            }
            assert_eq!(
                seen,
                (0..n).collect::<Vec<_>>(),
                "n={n} api_max={api_max} max={max_entries}"
            );
        }
    }

    #[test]
    fn zero_max_entries_returns_one_api_page() {
        let (entries, next) = block_on(collect(Cursor::default(), 0, |size, api| {
            list(10, 4, size, api)
        }))
        .expect("fake never fails");
        assert_eq!(entries, vec![0, 1, 2, 3]);
        assert!(!next.is_empty());
    }
}
