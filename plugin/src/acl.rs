//! Per-topic access control from a Mosquitto `acl_file`, so existing
//! deployments carry their ACLs over like their password files, with the
//! same answers (tested against Debian's Mosquitto 2.0 with one file).
//!
//! The format, as Mosquitto reads it:
//!
//! ```text
//! # a comment
//! topic [read|write|readwrite|deny] <filter>     before any `user` line: clients
//!                                                 without a username
//! user <username>                                 the lines below are that user's
//! topic [read|write|readwrite|deny] <filter>
//! pattern [read|write|readwrite|deny] <filter>   every client; %c is its client id,
//!                                                 %u its username
//! ```
//!
//! The access word may be left out (`readwrite`). A client may publish on a
//! topic it may write, and receives a message only on a topic it may read;
//! subscribing is always allowed (each message is checked as it is
//! delivered), as in Mosquitto. The decision, in Mosquitto's order:
//!
//! 1. the client's own list (its `user` block, or the anonymous lines when it
//!    sent no username): a matching `deny` refuses; else a matching line with
//!    the access allows;
//! 2. the patterns, refused outright for a client id or username containing
//!    `+` or `#` (which would match other clients' topics): a matching `deny`
//!    refuses; else a matching pattern with the access allows (a pattern with
//!    `%u` applies only to clients with a username);
//! 3. anything else is refused.

use crate::topics::topic_matches;
use std::collections::HashMap;
use std::path::Path;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive a message published there.
    Read,
    /// Publish there.
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Grant::ReadWrite, _) | (Grant::Read, Access::Read) | (Grant::Write, Access::Write)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    grant: Grant,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclFile {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl AclFile {
    pub fn load(path: &Path) -> Result<Self, crate::auth::FileError> {
        crate::auth::load_file(path, Self::parse)
    }

    /// Parses the file's text; an error names the 1-based line.
    pub fn parse(text: &str) -> Result<Self, (usize, &'static str)> {
        let mut acl = AclFile::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_matches([' ', '\t', '\r']);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim_start_matches([' ', '\t']);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err((i + 1, "`user` without a name"));
                    }
                    user = Some(rest.to_owned());
                    acl.users.entry(rest.to_owned()).or_default();
                }
                "topic" | "pattern" => {
                    let (word, after) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
                    let (grant, filter) = match word {
                        "read" => (Grant::Read, after),
                        "write" => (Grant::Write, after),
                        "readwrite" => (Grant::ReadWrite, after),
                        "deny" => (Grant::Deny, after),
                        _ => (Grant::ReadWrite, rest),
                    };
                    let filter = filter.trim_start_matches([' ', '\t']);
                    if filter.is_empty() {
                        return Err((i + 1, "a rule without a topic"));
                    }
                    let rule = Rule { grant, filter: filter.to_owned() };
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                _ => return Err((i + 1, "not a `user`, `topic` or `pattern` line")),
            }
        }
        Ok(acl)
    }

    /// Whether the client may `access` `topic`.
    pub fn allows(&self, client_id: &str, username: Option<&str>, topic: &str, access: Access) -> bool {
        let own = match username {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or_default(),
            None => &self.anonymous,
        };
        if let Some(allowed) = decide(own.iter().map(|r| (r.grant, r.filter.as_str().into())), topic, access)
        {
            return allowed;
        }
        if self.patterns.is_empty() {
            return false;
        }
        let dangerous = |s: &str| s.contains(['+', '#']);
        if dangerous(client_id) || username.is_some_and(dangerous) {
            return false;
        }
        let patterns = self.patterns.iter().filter_map(|r| {
            if r.filter.contains("%u") && username.is_none() {
                return None;
            }
            let filter = r.filter.replace("%c", client_id).replace("%u", username.unwrap_or_default());
            Some((r.grant, filter.into()))
        });
        decide(patterns, topic, access).unwrap_or(false)
    }
}

/// Denials first, then grants: `Some(false)` on a matching `deny`,
/// `Some(true)` on a matching grant with the access, `None` otherwise.
fn decide<'a>(
    rules: impl Iterator<Item = (Grant, std::borrow::Cow<'a, str>)> + Clone,
    topic: &str,
    access: Access,
) -> Option<bool> {
    let matching = rules.filter(|(_, f)| topic_matches(f, topic));
    if matching.clone().any(|(g, _)| g == Grant::Deny) {
        return Some(false);
    }
    matching.clone().any(|(g, _)| g.allows(access)).then_some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules of Mosquitto's own ACL test (test/broker/09-acl-access-variants.py).
    const MOSQUITTO_TEST: &str = "topic readwrite topic/global/#\ntopic deny      topic/global/except\n\
        user username\ntopic readwrite topic/username/#\ntopic deny      topic/username/except\n\
        pattern readwrite pattern/%u/#\npattern deny      pattern/%u/except\n";

    #[test]
    fn gives_the_answers_of_mosquittos_own_acl_test() {
        let acl = AclFile::parse(MOSQUITTO_TEST).expect("parses");
        for (user, topic, allowed) in [
            (None, "topic/global", true),
            (Some("username"), "topic/global", false),
            (None, "topic/global/except", false),
            (None, "topic/username", false),
            (Some("username"), "topic/username", true),
            (Some("username"), "topic/username/except", false),
            (None, "pattern/username", false),
            (Some("username"), "pattern/username", true),
            (Some("username"), "pattern/username/except", false),
        ] {
            for access in [Access::Read, Access::Write] {
                assert_eq!(
                    acl.allows("acl-check", user, topic, access),
                    allowed,
                    "{user:?} {topic} {access:?}"
                );
            }
        }
    }

    #[test]
    fn access_words_client_ids_and_dangerous_names() {
        let acl = AclFile::parse(
            "# comment\n\ntopic read r/#\ntopic write w/#\nuser a b\ntopic $SYS/#\npattern clients/%c/#\n",
        )
        .expect("parses");
        assert!(acl.allows("c", None, "r/x", Access::Read) && !acl.allows("c", None, "r/x", Access::Write));
        assert!(acl.allows("c", None, "w/x", Access::Write) && !acl.allows("c", None, "w/x", Access::Read));
        assert!(acl.allows("c", Some("a b"), "$SYS/x", Access::Read), "user names may hold spaces");
        assert!(acl.allows("c1", None, "clients/c1/t", Access::Write));
        assert!(!acl.allows("c1", None, "clients/c2/t", Access::Write));
        assert!(!acl.allows("+", None, "clients/x/t", Access::Write), "a wildcard client id gets no pattern");
        assert!(!acl.allows("c", Some("nobody"), "r/x", Access::Read), "an unknown user has no rules");
        assert_eq!(AclFile::parse("topic\n"), Err((1, "a rule without a topic")));
        assert_eq!(AclFile::parse("ok read x\n"), Err((1, "not a `user`, `topic` or `pattern` line")));
    }
}
