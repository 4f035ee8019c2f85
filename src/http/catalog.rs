//! The catalogue API (issue 9, point 4): the platform keeps splitpay's copy of its organisations, recipient account
//! links and recommendation sets current with idempotent `PUT`s under the service token, retires links and sets
//! (`POST …/deactivate`, `POST …/archive`), reads each back, and lists split payments page by page.
//!
//! Field names are the contract's (`RecommendationSet`, `RecommendationAllocation`, `RecipientAccountDetail`), plus
//! what splitpay needs that the contract lacks (`organisation_id`, `amount_mode`, `currency` on a set; the
//! distributor and recipient organisations on a link). A `PUT` answers 201 when it created the resource and 200
//! when it updated it or found it already so (then nothing is written). Responses are `{ "data": … }`, as the
//! contract's; errors are its `ErrorEnvelope` with `param` naming the field. Anything refused writes nothing.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{request_id, ApiError};
use super::intake::render;
use super::request::{parse_json_body, require_token, respond};
use super::HttpState;
use crate::domain::ids::{check_external_id, SplitPaymentId};
use crate::domain::money::Currency;
use crate::domain::plan::AmountMode;
use crate::domain::state::PaymentStatus;
use crate::events::seed_timestamp;
use crate::store::catalog::{
    check_set_amounts, get_link, get_organisation, get_recommendation_set, links_of_distributor, retire_link,
    retire_recommendation_set, upsert_link, upsert_organisation, upsert_recommendation_set, CatalogError, LinkRow,
    LinkUpsert, NewOrganisation, NewRecommendationSet, NewSetAllocation, RecommendationSetRow, SetUpsert, Upserted,
};
use crate::store::payments::{get_split_payment, list_split_payment_ids};
use crate::store::StoreError;

/// Page size of `GET /v1/split-payments` when none is asked for, and the largest allowed (the contract's).
const LIST_LIMIT_DEFAULT: i64 = 10;
const LIST_LIMIT_MAX: i64 = 100;

/// The path's id: the platform's id form; a body may repeat it but not contradict it.
fn path_id(raw: &str, body_id: Option<&str>, rid: &str) -> Result<(), ApiError> {
    check_external_id("id", raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string(), rid).with_param("id"))?;
    match body_id {
        Some(id) if id != raw => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "validation_failed",
            format!("the body's id '{id}' is not the path's '{raw}'"),
            rid,
        )
        .with_param("id")),
        _ => Ok(()),
    }
}

fn validation(param: &str, message: impl Into<String>, rid: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message, rid).with_param(param)
}

fn internal(e: &dyn std::fmt::Display, rid: &str) -> ApiError {
    tracing::error!(request_id = rid, error = %e, "catalogue request failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "Internal error",
        rid,
    )
}

fn store_error(e: StoreError, rid: &str) -> ApiError {
    match e {
        StoreError::NotFound { what, id } => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} '{id}' not found"),
            rid,
        )
        .with_param("id"),
        e => internal(&e, rid),
    }
}

fn catalog_error(e: CatalogError, rid: &str) -> ApiError {
    match e {
        CatalogError::Invalid { param, message } => validation(&param, message, rid),
        CatalogError::UnknownReference { param, message } => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message, rid).with_param(param)
        }
        CatalogError::Conflict { param, message } => {
            ApiError::new(StatusCode::CONFLICT, "conflict", message, rid).with_param(param)
        }
        CatalogError::Store(e) => store_error(e, rid),
    }
}

fn status_of(outcome: Upserted) -> StatusCode {
    match outcome {
        Upserted::Created => StatusCode::CREATED,
        Upserted::Updated | Upserted::Unchanged => StatusCode::OK,
    }
}

fn data(outcome: Upserted, value: Value) -> (StatusCode, Value) {
    (status_of(outcome), json!({ "data": value }))
}

// ---- organisations ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrganisationBody {
    #[serde(default)]
    id: Option<String>,
    name: String,
}

async fn render_organisation(state: &HttpState, id: &str) -> Result<Value, StoreError> {
    let mut conn = state.app.pool.acquire().await?;
    let org = get_organisation(&mut conn, id).await?;
    let links = links_of_distributor(&mut conn, id).await?;
    Ok(json!({
        "id": org.id,
        "object": "organisation",
        "name": org.name,
        "created_at": seed_timestamp(org.created_at),
        "recipient_org_account_link_ids": links,
    }))
}

pub async fn put_organisation(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let body: OrganisationBody = parse_json_body(&headers, &body, &rid)?;
        path_id(&id, body.id.as_deref(), &rid)?;
        let mut conn = state.app.pool.acquire().await.map_err(|e| internal(&e, &rid))?;
        let outcome = upsert_organisation(
            &mut conn,
            &NewOrganisation {
                id: id.clone(),
                name: body.name,
            },
        )
        .await
        .map_err(|e| catalog_error(e, &rid))?;
        drop(conn);
        let value = render_organisation(&state, &id)
            .await
            .map_err(|e| store_error(e, &rid))?;
        Ok(data(outcome, value))
    }
    .await;
    respond(&rid, result)
}

pub async fn get_organisation_handler(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let value = render_organisation(&state, &id)
            .await
            .map_err(|e| store_error(e, &rid))?;
        Ok((StatusCode::OK, json!({ "data": value })))
    }
    .await;
    respond(&rid, result)
}

// ---- recipient account links ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    #[serde(default)]
    id: Option<String>,
    distributor_organisation_id: String,
    recipient_organisation_id: String,
    recipient_org_name: String,
    label: String,
    stripe_connect_account_id: String,
    #[serde(default)]
    charges_enabled: Option<bool>,
    #[serde(default)]
    is_active: Option<bool>,
}

/// `RecipientAccountDetail`'s fields that splitpay keeps, and splitpay's own.
fn render_link(link: &LinkRow) -> Value {
    json!({
        "id": link.id,
        "object": "recipient_account_link",
        "label": link.label,
        "recipient_org_name": link.recipient_org_name,
        "is_active": link.is_active,
        "archived_at": link.archived_at.map(seed_timestamp),
        "created_at": seed_timestamp(link.created_at),
        "updated_at": seed_timestamp(link.updated_at),
        "stripe_connect_account_id": link.stripe_connect_account_id,
        "charges_enabled": link.charges_enabled,
        "distributor_organisation_id": link.distributor_organisation_id,
        "recipient_organisation_id": link.recipient_organisation_id,
    })
}

pub async fn put_link(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let body: LinkBody = parse_json_body(&headers, &body, &rid)?;
        path_id(&id, body.id.as_deref(), &rid)?;
        let upsert = LinkUpsert {
            id: id.clone(),
            distributor_organisation_id: body.distributor_organisation_id,
            recipient_organisation_id: body.recipient_organisation_id,
            recipient_org_name: body.recipient_org_name,
            label: body.label,
            stripe_connect_account_id: body.stripe_connect_account_id,
            charges_enabled: body.charges_enabled,
            is_active: body.is_active,
        };
        let mut tx = state.app.pool.begin().await.map_err(|e| internal(&e, &rid))?;
        let (outcome, link) = upsert_link(&mut tx, &upsert)
            .await
            .map_err(|e| catalog_error(e, &rid))?;
        tx.commit().await.map_err(|e| internal(&e, &rid))?;
        Ok(data(outcome, render_link(&link)))
    }
    .await;
    respond(&rid, result)
}

pub async fn get_link_handler(State(state): State<HttpState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let mut conn = state.app.pool.acquire().await.map_err(|e| internal(&e, &rid))?;
        let link = get_link(&mut conn, &id).await.map_err(|e| store_error(e, &rid))?;
        Ok((StatusCode::OK, json!({ "data": render_link(&link) })))
    }
    .await;
    respond(&rid, result)
}

async fn retire_link_handler(state: HttpState, headers: HeaderMap, id: String, archive: bool) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let mut conn = state.app.pool.acquire().await.map_err(|e| internal(&e, &rid))?;
        let (_, link) = retire_link(&mut conn, &id, archive)
            .await
            .map_err(|e| store_error(e, &rid))?;
        Ok((StatusCode::OK, json!({ "data": render_link(&link) })))
    }
    .await;
    respond(&rid, result)
}

pub async fn deactivate_link(State(state): State<HttpState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    retire_link_handler(state, headers, id, false).await
}

pub async fn archive_link(State(state): State<HttpState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    retire_link_handler(state, headers, id, true).await
}

// ---- recommendation sets ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBody {
    #[serde(default)]
    id: Option<String>,
    organisation_id: String,
    name: String,
    slug: String,
    amount_mode: String,
    currency: String,
    #[serde(default)]
    is_active: Option<bool>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    donor_prefill: Option<BTreeMap<String, String>>,
    allocations: Vec<AllocationBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllocationBody {
    id: String,
    recipient_org_account_link_id: String,
    amount_cents: i64,
}

/// `RecommendationSetDetail` (without `url_key` and `description`, which splitpay does not keep), plus
/// `organisation_id`, `amount_mode` and `currency`.
fn render_set(set: &RecommendationSetRow) -> Value {
    json!({
        "id": set.id,
        "object": "recommendation_set",
        "organisation_id": set.organisation_id,
        "name": set.name,
        "slug": set.slug,
        "amount_mode": set.amount_mode.as_str(),
        "currency": set.currency.iso_code(),
        "is_active": set.is_active,
        "archived_at": set.archived_at.map(seed_timestamp),
        "expires_at": set.expires_at.map(seed_timestamp),
        "total_amount_cents": set.allocations.iter().map(|a| a.amount_cents).sum::<i64>(),
        "allocation_count": set.allocations.len(),
        "donor_prefill_email": set.donor_prefill.as_ref().and_then(|p| p.get("email")).cloned(),
        "donor_prefill": set.donor_prefill,
        "created_at": seed_timestamp(set.created_at),
        "allocations": set.allocations.iter().map(|a| json!({
            "id": a.id,
            "amount_cents": a.amount_cents,
            "recipient_org_account_link_id": a.recipient_org_account_link_id,
            "link_label": a.link_label,
            "recipient_org_name": a.recipient_org_name,
        })).collect::<Vec<_>>(),
    })
}

/// The body as a set, with every rule that needs no database checked.
fn set_from_body(state: &HttpState, id: &str, body: SetBody, rid: &str) -> Result<SetUpsert, ApiError> {
    path_id(id, body.id.as_deref(), rid)?;
    for (param, value) in [("organisation_id", &body.organisation_id), ("slug", &body.slug)] {
        check_external_id(param, value).map_err(|e| validation(param, e.to_string(), rid))?;
    }
    let amount_mode = AmountMode::parse(&body.amount_mode)
        .ok_or_else(|| validation("amount_mode", "must be FIXED, SUGGESTED or OPEN", rid))?;
    let limits = &state.app.distribution.plan_limits;
    let currency = Currency::parse(&body.currency)
        .ok()
        .filter(|c| limits.settlement_currencies.contains(c))
        .ok_or_else(|| {
            let accepted: Vec<String> = limits.settlement_currencies.iter().map(|c| c.iso_code()).collect();
            validation(
                "currency",
                format!(
                    "'{}' is not a settlement currency of this platform (accepted: {})",
                    body.currency,
                    accepted.join(", ")
                ),
                rid,
            )
        })?;
    let mut allocations = Vec::with_capacity(body.allocations.len());
    for (i, a) in body.allocations.into_iter().enumerate() {
        check_external_id("the allocation id", &a.id)
            .map_err(|e| validation(&format!("allocations[{i}].id"), e.to_string(), rid))?;
        check_external_id("the link id", &a.recipient_org_account_link_id).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string(), rid)
                .with_param(format!("allocations[{i}].recipient_org_account_link_id"))
        })?;
        allocations.push(NewSetAllocation {
            id: a.id,
            recipient_org_account_link_id: a.recipient_org_account_link_id,
            amount_cents: a.amount_cents,
        });
    }
    check_set_amounts(amount_mode, &allocations, limits.min_allocation_cents).map_err(|e| catalog_error(e, rid))?;
    Ok(SetUpsert {
        set: NewRecommendationSet {
            id: id.to_owned(),
            organisation_id: body.organisation_id,
            name: body.name,
            slug: body.slug,
            amount_mode,
            currency,
            expires_at: body.expires_at,
            donor_prefill: body.donor_prefill.map(|p| json!(p)),
            allocations,
        },
        is_active: body.is_active,
    })
}

pub async fn put_set(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let body: SetBody = parse_json_body(&headers, &body, &rid)?;
        let upsert = set_from_body(&state, &id, body, &rid)?;
        let mut tx = state.app.pool.begin().await.map_err(|e| internal(&e, &rid))?;
        let (outcome, set) = upsert_recommendation_set(&mut tx, &upsert)
            .await
            .map_err(|e| catalog_error(e, &rid))?;
        tx.commit().await.map_err(|e| internal(&e, &rid))?;
        Ok(data(outcome, render_set(&set)))
    }
    .await;
    respond(&rid, result)
}

pub async fn get_set(State(state): State<HttpState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let mut conn = state.app.pool.acquire().await.map_err(|e| internal(&e, &rid))?;
        let set = get_recommendation_set(&mut conn, &id)
            .await
            .map_err(|e| store_error(e, &rid))?;
        Ok((StatusCode::OK, json!({ "data": render_set(&set) })))
    }
    .await;
    respond(&rid, result)
}

async fn retire_set_handler(state: HttpState, headers: HeaderMap, id: String, archive: bool) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let mut conn = state.app.pool.acquire().await.map_err(|e| internal(&e, &rid))?;
        let (_, set) = retire_recommendation_set(&mut conn, &id, archive)
            .await
            .map_err(|e| store_error(e, &rid))?;
        Ok((StatusCode::OK, json!({ "data": render_set(&set) })))
    }
    .await;
    respond(&rid, result)
}

pub async fn deactivate_set(State(state): State<HttpState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    retire_set_handler(state, headers, id, false).await
}

pub async fn archive_set(State(state): State<HttpState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    retire_set_handler(state, headers, id, true).await
}

// ---- split payments, page by page ----

/// `GET /v1/split-payments?recommendation_set_id=&status=&limit=&starting_after=`: newest first; `has_more` says
/// whether another page follows (ask for it with `starting_after` = the last id of this one).
pub async fn list_payments(State(state): State<HttpState>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let rid = request_id();
    let result = async {
        require_token(&state, &headers, &rid)?;
        let bad = |param: &str, message: String| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message, &rid).with_param(param)
        };
        let (mut set_id, mut status, mut limit, mut after) = (None, None, LIST_LIMIT_DEFAULT, None);
        let mut seen = Vec::new();
        for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
            if seen.contains(&key) {
                return Err(bad(&key, format!("'{key}' is given twice")));
            }
            match key.as_ref() {
                "recommendation_set_id" => {
                    check_external_id("recommendation_set_id", &value)
                        .map_err(|e| bad("recommendation_set_id", e.to_string()))?;
                    set_id = Some(value.to_string());
                }
                "status" => {
                    status = Some(PaymentStatus::parse(&value).ok_or_else(|| {
                        bad(
                            "status",
                            "must be CREATED, REQUIRES_PAYMENT, PROCESSING, SUCCEEDED, FAILED or CANCELED".into(),
                        )
                    })?)
                }
                "limit" => {
                    limit = value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (1..=LIST_LIMIT_MAX).contains(n))
                        .ok_or_else(|| bad("limit", format!("must be an integer from 1 to {LIST_LIMIT_MAX}")))?
                }
                "starting_after" => {
                    after = Some(
                        SplitPaymentId::parse(&value)
                            .map_err(|_| bad("starting_after", "must be a split payment id (spay_…)".into()))?,
                    )
                }
                other => return Err(bad(other, format!("unknown query parameter '{other}'"))),
            }
            seen.push(key);
        }
        let mut conn = state.app.pool.acquire().await.map_err(|e| internal(&e, &rid))?;
        let mut ids = list_split_payment_ids(&mut conn, set_id.as_deref(), status, after.as_ref(), limit + 1)
            .await
            .map_err(|e| internal(&e, &rid))?;
        let has_more = ids.len() as i64 > limit;
        ids.truncate(limit as usize);
        let mut page = Vec::with_capacity(ids.len());
        for id in &ids {
            let payment = get_split_payment(&mut conn, id).await.map_err(|e| internal(&e, &rid))?;
            page.push(render(&payment, None));
        }
        Ok((StatusCode::OK, json!({ "data": page, "has_more": has_more })))
    }
    .await;
    respond(&rid, result)
}
