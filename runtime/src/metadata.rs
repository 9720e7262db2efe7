//! Metadata stored beside each event: correlation and causation ids, a reference, headers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What is recorded about an event besides its payload. Set it for a whole context with
/// [`Context::set_metadata`](crate::Context::set_metadata) and per event with
/// [`Context::apply_with`](crate::Context::apply_with); per-event fields win, headers merge.
///
/// The event id and the time of recording are kept apart, on
/// [`RecordedEvent`](crate::RecordedEvent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Metadata {
    /// Ties together every event caused by one request or process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<uuid::Uuid>,
    /// The id of the event or message that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<uuid::Uuid>,
    /// A free reference: a user, a request id, a ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// User headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: uuid::Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: uuid::Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the free reference.
    pub fn reference(mut self, reference: impl Into<String>) -> Self {
        self.reference = Some(reference.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none()
            && self.causation_id.is_none()
            && self.reference.is_none()
            && self.headers.is_empty()
    }

    /// `self` with the fields of `over` laid on top.
    pub(crate) fn merged(&self, over: &Metadata) -> Metadata {
        let mut headers = self.headers.clone();
        headers.extend(over.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        Metadata {
            correlation_id: over.correlation_id.or(self.correlation_id),
            causation_id: over.causation_id.or(self.causation_id),
            reference: over.reference.clone().or_else(|| self.reference.clone()),
            headers,
        }
    }

    /// The stored form: `None` when empty, JSON otherwise.
    pub(crate) fn encode(&self) -> Option<Vec<u8>> {
        if self.is_empty() {
            None
        } else {
            serde_json::to_vec(self).ok()
        }
    }

    /// Reads the stored form; `None` and empty both give empty metadata.
    pub(crate) fn decode(bytes: Option<&[u8]>) -> Result<Metadata, serde_json::Error> {
        match bytes {
            None | Some([]) => Ok(Metadata::default()),
            Some(b) => serde_json::from_slice(b),
        }
    }
}
