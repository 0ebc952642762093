//! Finding a bearer token in a request. Browsers cannot set headers on a
//! WebSocket, so besides `Authorization: Bearer` a token may travel as a
//! `Sec-WebSocket-Protocol` entry or a query parameter.

use std::borrow::Cow;

use serde::Deserialize;
use sluice_plugin_sdk::{Fields, Request};

/// Where to look for a token, tried in the order of the fields.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSources {
    /// Read `Authorization: Bearer <token>`.
    pub header: bool,
    /// Read the `Sec-WebSocket-Protocol` entry `<prefix><token>`; `null` disables.
    pub protocol_prefix: Option<String>,
    /// Read this query parameter; `null` disables.
    pub query_param: Option<String>,
}

impl Default for TokenSources {
    fn default() -> Self {
        Self {
            header: true,
            protocol_prefix: Some("bearer.".into()),
            query_param: Some("access_token".into()),
        }
    }
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFrom {
    /// The `Authorization` header.
    Header,
    /// This entry of `Sec-WebSocket-Protocol` (the whole entry, prefix included).
    Protocol(String),
    /// The query string.
    Query,
}

impl TokenSources {
    /// The request headers [`TokenSources::find`] reads.
    pub fn headers(&self) -> impl Iterator<Item = String> {
        self.header.then(|| "authorization".to_owned()).into_iter()
    }

    /// The other request fields [`TokenSources::find`] reads: the subprotocols
    /// and the query, when those sources are on.
    pub fn fields(&self) -> Fields {
        let mut fields = Fields::empty();
        if self.protocol_prefix.is_some() {
            fields |= Fields::SUBPROTOCOLS;
        }
        if self.query_param.is_some() {
            fields |= Fields::QUERY;
        }
        fields
    }

    /// The first token present, and where it was.
    pub fn find<'r>(&self, req: &'r Request) -> Option<(Cow<'r, str>, TokenFrom)> {
        if self.header
            && let Some(token) = req.bearer_token()
        {
            return Some((Cow::Borrowed(token), TokenFrom::Header));
        }
        if let Some(prefix) = &self.protocol_prefix {
            let found = req.subprotocols().find_map(|entry| {
                let token = entry.strip_prefix(prefix.as_str())?;
                Some((Cow::Borrowed(token), TokenFrom::Protocol(entry.to_owned())))
            });
            if found.is_some() {
                return found;
            }
        }
        let name = self.query_param.as_deref()?;
        req.query(name)
            .filter(|t| !t.is_empty())
            .map(|t| (t, TokenFrom::Query))
    }
}

#[cfg(test)]
mod tests {
    use sluice_plugin_sdk::testing::request;

    use super::*;

    #[test]
    fn sources_in_order() {
        let all = TokenSources::default();
        let req = request()
            .path("/ws?access_token=q")
            .header("sec-websocket-protocol", "chat, bearer.p")
            .header("authorization", "Bearer h")
            .build();
        assert_eq!(all.find(&req), Some(("h".into(), TokenFrom::Header)));
        let no_header = TokenSources {
            header: false,
            ..all.clone()
        };
        assert_eq!(
            no_header.find(&req),
            Some(("p".into(), TokenFrom::Protocol("bearer.p".into())))
        );
        let query_only = TokenSources {
            protocol_prefix: None,
            ..no_header
        };
        assert_eq!(query_only.find(&req), Some(("q".into(), TokenFrom::Query)));
        assert_eq!(all.find(&request().build()), None);
    }
}
