//! Events: one per state change, kept for `/v1/events` and handed to the webhook deliverer.

use serde_json::{json, Value};

use super::{page, Model, SimError};
use crate::stripe::sim::form::Form;

#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub type_: String,
    pub created: i64,
    pub object: Value,
    /// The connected account the event is about (Stripe's top-level `account` of Connect events); `None` for
    /// the platform's own events. Connect events go only to Connect endpoints, platform events only to the others.
    pub account: Option<String>,
}

impl Event {
    pub fn json(&self) -> Value {
        let mut event = json!({
            "id": self.id,
            "object": "event",
            "api_version": stripe_shared::version::VERSION.as_str(),
            "created": self.created,
            "data": { "object": self.object },
            "livemode": false,
            "pending_webhooks": 1,
            "request": { "id": null, "idempotency_key": null },
            "type": self.type_,
        });
        if let Some(account) = &self.account {
            event["account"] = json!(account);
        }
        event
    }
}

/// Stripe's `created` filter on lists: `created=T`, or any of `created[gt|gte|lt|lte]=T` (unix seconds).
#[derive(Debug, Default)]
struct CreatedRange {
    exact: Option<i64>,
    gt: Option<i64>,
    gte: Option<i64>,
    lt: Option<i64>,
    lte: Option<i64>,
}

impl CreatedRange {
    fn from_query(query: &Form) -> Result<Self, SimError> {
        Ok(Self {
            exact: query.int("created")?,
            gt: query.int("created[gt]")?,
            gte: query.int("created[gte]")?,
            lt: query.int("created[lt]")?,
            lte: query.int("created[lte]")?,
        })
    }

    fn contains(&self, t: i64) -> bool {
        self.exact.is_none_or(|x| t == x)
            && self.gt.is_none_or(|x| t > x)
            && self.gte.is_none_or(|x| t >= x)
            && self.lt.is_none_or(|x| t < x)
            && self.lte.is_none_or(|x| t <= x)
    }
}

impl Model {
    pub fn list_events(&self, query: &Form) -> Result<Value, SimError> {
        query.only(&[
            "created",
            "delivery_success",
            "ending_before",
            "limit",
            "starting_after",
            "type",
            "types",
        ])?;
        let limit = query.int("limit")?.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(SimError::invalid("limit", "limit must be between 1 and 100"));
        }
        // `type` takes one type or a `*` wildcard (`charge.dispute.*`); `types[]` up to 20 exact types. Not both.
        let type_ = query.get("type");
        let types = query.list("types");
        if type_.is_some() && !types.is_empty() {
            return Err(SimError::invalid(
                "types",
                "You may only specify one of these parameters: type, types.",
            ));
        }
        if types.len() > 20 {
            return Err(SimError::invalid("types", "types may contain at most 20 event types"));
        }
        let matches_type = |name: &str| match type_ {
            Some(pattern) => match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            },
            None => types.is_empty() || types.iter().any(|t| t == name),
        };
        let created = CreatedRange::from_query(query)?;
        let matching: Vec<&Event> = self
            .events
            .iter()
            .rev()
            .filter(|e| matches_type(&e.type_))
            .filter(|e| created.contains(e.created))
            .collect();
        page(&matching, query, limit, "/v1/events", |e| e.id.as_str(), Event::json)
    }

    pub fn event(&self, id: &str) -> Option<Event> {
        self.events.iter().find(|e| e.id == id).cloned()
    }

    pub fn retrieve_event(&self, id: &str) -> Result<Value, SimError> {
        self.events
            .iter()
            .find(|e| e.id == id)
            .map(Event::json)
            .ok_or_else(|| SimError::missing("event", id, Some("id")))
    }
}
