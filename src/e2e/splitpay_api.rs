//! splitpay's own API as the platform calls it: the catalogue (`PUT /v1/organisations/…`,
//! `/v1/recipient-account-links/…`, `/v1/recommendation-sets/…`) and intake (`POST /v1/split-payments`), with the
//! service token. The token never appears in output.

use serde_json::Value;

use super::Failure;
use crate::config::Secret;

#[derive(Clone)]
pub struct SplitpayApi {
    http: reqwest::Client,
    /// e.g. `http://127.0.0.1:8080`, without a trailing slash.
    base_url: String,
    token: Secret,
}

impl SplitpayApi {
    pub fn new(base_url: &str, token: Secret) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `PUT path` with `body`; any answer but 200/201 is an error quoting splitpay's error envelope.
    pub async fn put(&self, path: &str, body: Value) -> Result<Value, Failure> {
        let request = self
            .http
            .put(format!("{}{path}", self.base_url))
            .bearer_auth(self.token.expose())
            .json(&body);
        answer(request, "PUT", path).await
    }

    /// `POST /v1/split-payments` with `Idempotency-Key: key`.
    pub async fn pay(&self, body: Value, key: &str) -> Result<Value, Failure> {
        let request = self
            .http
            .post(format!("{}/v1/split-payments", self.base_url))
            .bearer_auth(self.token.expose())
            .header("idempotency-key", key)
            .json(&body);
        answer(request, "POST", "/v1/split-payments").await
    }
}

async fn answer(request: reqwest::RequestBuilder, method: &str, path: &str) -> Result<Value, Failure> {
    let response = request
        .send()
        .await
        .map_err(|e| format!("{method} {path}: splitpay's API could not be reached: {e}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(format!("{method} {path}: splitpay answered {status}: {body}").into());
    }
    Ok(body)
}
