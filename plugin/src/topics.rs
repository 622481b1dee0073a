//! The notary's own topic names, and MQTT topic-filter matching.
//!
//! Everything under the notary's root belongs to mqtt-notary: it is never
//! notarized, and only the notary publishes answers, checkpoints and
//! rejection events there. The root is `$notary`, where MQTT puts server
//! topics (like `$SYS`): subscriptions starting with `#` or `+` never
//! match it (MQTT-4.7.2-1). `[topics] legacy = true` keeps the previous
//! release's names under `notary/` for one release ([`Topics::LEGACY`]).

/// The notary's topic names: the current ones under `$notary/`, or the
/// previous release's under `notary/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topics {
    legacy: bool,
}

impl Default for Topics {
    fn default() -> Self {
        Topics::CURRENT
    }
}

impl Topics {
    /// `$notary/...`, with a private inbox per client for proof answers.
    pub const CURRENT: Topics = Topics { legacy: false };
    /// The previous release's `notary/...` names and reply rules: answers
    /// go to any `reply_to` under `notary/proof/response/`, which every
    /// client may subscribe to.
    pub const LEGACY: Topics = Topics { legacy: true };

    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// The current name, or the legacy one.
    fn pick(&self, current: &'static str, legacy: &'static str) -> &'static str {
        if self.legacy {
            legacy
        } else {
            current
        }
    }

    /// Topics under this prefix belong to mqtt-notary and are never notarized.
    pub fn prefix(&self) -> &'static str {
        self.pick("$notary/", "notary/")
    }

    /// Whether `topic` lies under the notary's root.
    pub fn is_own(&self, topic: &str) -> bool {
        topic.starts_with(self.prefix())
    }

    /// Proof requests over MQTT (docs/PROTOCOL.md §Proofs over MQTT).
    pub fn proof_request(&self) -> &'static str {
        self.pick("$notary/proof/request", "notary/proof/request")
    }

    /// The newest signed checkpoint, retained.
    pub fn checkpoint(&self) -> &'static str {
        self.pick("$notary/checkpoint", "notary/checkpoint")
    }

    /// Rejection events, as JSON (docs/PROTOCOL.md §Rejections).
    pub fn rejections(&self) -> &'static str {
        self.pick("$notary/rejections", "notary/rejections")
    }

    /// Where a request's `reply_to` must lie when the asker is not known
    /// (a sidecar on a broker that does not say who published).
    pub fn reply_prefix(&self) -> &'static str {
        self.pick(INBOX_PREFIX, "notary/proof/response/")
    }

    /// Answers to requests that name no usable reply topic, when the asker
    /// is not known.
    pub fn errors(&self) -> &'static str {
        self.pick("$notary/proof/errors", "notary/proof/errors")
    }

    /// A client's private inbox (with its trailing `/`): answers to its
    /// proof requests go to topics under it, and no other client may
    /// subscribe there. `None` with the legacy names, which have no inboxes.
    pub fn inbox(&self, client_id: &str) -> Option<String> {
        (!self.legacy).then(|| format!("{INBOX_PREFIX}{}/", inbox_name(client_id)))
    }

    /// Why `client_id` may not subscribe to `filter` (the filter without a
    /// `$share/<group>/` prefix): it could match another client's inbox.
    pub fn subscribe_problem(&self, filter: &str, client_id: &str) -> Option<&'static str> {
        if self.legacy {
            return None;
        }
        let mut levels = filter.split('/');
        if levels.next() != Some("$notary") {
            return None;
        }
        let second = levels.next();
        let third = levels.next();
        let refused = match (second, third) {
            (Some("#"), _) => true,
            // Inbox topics have at least four levels.
            (Some("+" | "inbox"), None) => false,
            (Some("+" | "inbox"), Some(name)) => name != inbox_name(client_id),
            _ => false,
        };
        refused.then_some(
            "a filter under $notary/ may match only the subscriber's own inbox, $notary/inbox/<client id>/",
        )
    }
}

/// Every client's inbox lies under this prefix.
pub const INBOX_PREFIX: &str = "$notary/inbox/";

/// A client id as one topic level, so that no client's inbox lies inside
/// another's: `%`, `/`, `+` and `#` are written `%25`, `%2F`, `%2B` and
/// `%23` (percent-encoding, which is one-to-one). Most client ids have
/// none of them and read unchanged.
pub fn inbox_name(client_id: &str) -> String {
    let mut out = String::with_capacity(client_id.len());
    for c in client_id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

/// MQTT topic filter matching (`+` one level, `#` the rest). As in MQTT,
/// wildcards at the first level do not match topics starting with `$`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Checks a topic filter as MQTT defines one.
pub fn valid_topic_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && levels.iter().enumerate().all(|(i, l)| match *l {
            "#" => i == levels.len() - 1,
            "+" => true,
            l => !l.contains(['+', '#']),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_match_as_mqtt_does() {
        for (f, t, m) in [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "x/y", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("a/+/c", "a//c", true),
            ("a/b", "a/b/", false),
        ] {
            assert_eq!(topic_matches(f, t), m, "{f} {t}");
        }
        assert!(valid_topic_filter("a/+/#"));
        assert!(!valid_topic_filter("a/#/b"));
        assert!(!valid_topic_filter("a/b+"));
        assert!(!valid_topic_filter(""));
    }

    #[test]
    fn inboxes_are_private_and_one_client_id_names_one_inbox() {
        let t = Topics::CURRENT;
        assert_eq!(t.inbox("dev-1").as_deref(), Some("$notary/inbox/dev-1/"));
        // No client's inbox lies inside another's.
        assert_eq!(inbox_name("a/b"), "a%2Fb");
        assert_ne!(inbox_name("a/b"), inbox_name("a%2Fb"));
        assert_eq!(inbox_name("+#%"), "%2B%23%25");
        for (filter, ok) in [
            ("$notary/inbox/me/#", true),
            ("$notary/inbox/me/proof", true),
            ("$notary/+/me/+", true),
            ("$notary/checkpoint", true),
            ("$notary/rejections", true),
            ("$notary/+", true),
            ("$notary/inbox", true),
            ("#", true),
            ("+/inbox/other/#", true),
            ("$notary/#", false),
            ("$notary/inbox/#", false),
            ("$notary/inbox/+/proof", false),
            ("$notary/+/+/#", false),
            ("$notary/inbox/other/#", false),
            ("$notary/+/other/proof", false),
        ] {
            assert_eq!(t.subscribe_problem(filter, "me").is_none(), ok, "{filter}");
        }
        assert!(Topics::LEGACY.subscribe_problem("notary/#", "me").is_none());
        assert_eq!(Topics::LEGACY.inbox("me"), None);
        assert!(Topics::CURRENT.is_own("$notary/checkpoint") && !Topics::CURRENT.is_own("notary/checkpoint"));
        assert!(Topics::LEGACY.is_own("notary/checkpoint") && !Topics::LEGACY.is_own("$notary/checkpoint"));
    }
}
