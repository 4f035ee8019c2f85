//! The platform's catalogue as splitpay reads it: organisations, recipient account links (a distributor's
//! authorised link to a recipient's Stripe connected account) and recommendation sets with their ordered
//! allocations. The API that owns these writes them; splitpay's writers here serve tests, the demo and seeding.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{StoreError, Tx};
use crate::domain::money::Currency;
use crate::domain::plan::{AmountMode, SetAllocation, SetRules, ALLOCATIONS_PER_SET_MAX, ALLOCATION_AMOUNT_MAX_CENTS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrganisation {
    pub id: String,
    pub name: String,
}

pub async fn create_organisation(conn: &mut PgConnection, org: &NewOrganisation) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO organisations (id, name) VALUES ($1, $2)")
        .bind(&org.id)
        .bind(&org.name)
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OrganisationRow {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

pub async fn get_organisation(conn: &mut PgConnection, id: &str) -> Result<OrganisationRow, StoreError> {
    sqlx::query_as::<_, OrganisationRow>("SELECT id, name, created_at FROM organisations WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "organisation",
            id: id.to_owned(),
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLink {
    pub id: String,
    pub distributor_organisation_id: String,
    pub recipient_organisation_id: String,
    pub recipient_org_name: String,
    pub label: String,
    pub stripe_connect_account_id: String,
    pub charges_enabled: bool,
    pub is_active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LinkRow {
    pub id: String,
    pub distributor_organisation_id: String,
    pub recipient_organisation_id: String,
    pub recipient_org_name: String,
    pub label: String,
    pub stripe_connect_account_id: String,
    pub charges_enabled: bool,
    pub is_active: bool,
    pub archived_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn create_link(conn: &mut PgConnection, link: &NewLink) -> Result<LinkRow, StoreError> {
    let row = sqlx::query_as::<_, LinkRow>(
        "INSERT INTO recipient_account_links
            (id, distributor_organisation_id, recipient_organisation_id, recipient_org_name, label,
             stripe_connect_account_id, charges_enabled, is_active)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING *",
    )
    .bind(&link.id)
    .bind(&link.distributor_organisation_id)
    .bind(&link.recipient_organisation_id)
    .bind(&link.recipient_org_name)
    .bind(&link.label)
    .bind(&link.stripe_connect_account_id)
    .bind(link.charges_enabled)
    .bind(link.is_active)
    .fetch_one(conn)
    .await?;
    Ok(row)
}

pub async fn get_link(conn: &mut PgConnection, id: &str) -> Result<LinkRow, StoreError> {
    sqlx::query_as::<_, LinkRow>("SELECT * FROM recipient_account_links WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "recipient account link",
            id: id.to_owned(),
        })
}

/// Updates a link's flags (the platform deactivates links; Stripe's `account.updated` toggles charges_enabled).
pub async fn set_link_flags(
    conn: &mut PgConnection,
    id: &str,
    charges_enabled: Option<bool>,
    is_active: Option<bool>,
) -> Result<LinkRow, StoreError> {
    sqlx::query_as::<_, LinkRow>(
        "UPDATE recipient_account_links
            SET charges_enabled = coalesce($2, charges_enabled), is_active = coalesce($3, is_active),
                updated_at = now()
          WHERE id = $1
         RETURNING *",
    )
    .bind(id)
    .bind(charges_enabled)
    .bind(is_active)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        what: "recipient account link",
        id: id.to_owned(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSetAllocation {
    pub id: String,
    pub recipient_org_account_link_id: String,
    pub amount_cents: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewRecommendationSet {
    pub id: String,
    pub organisation_id: String,
    pub name: String,
    pub slug: String,
    pub amount_mode: AmountMode,
    pub currency: Currency,
    pub expires_at: Option<DateTime<Utc>>,
    pub donor_prefill: Option<serde_json::Value>,
    /// In display order; positions are assigned from it.
    pub allocations: Vec<NewSetAllocation>,
}

/// A recommendation set with its allocations in order, each joined with the link it pays.
#[derive(Debug, Clone, PartialEq)]
pub struct RecommendationSetRow {
    pub id: String,
    pub organisation_id: String,
    pub name: String,
    pub slug: String,
    pub amount_mode: AmountMode,
    pub currency: Currency,
    pub is_active: bool,
    pub archived_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub donor_prefill: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub allocations: Vec<SetAllocationRow>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct SetHeadRow {
    id: String,
    organisation_id: String,
    name: String,
    slug: String,
    #[sqlx(try_from = "String")]
    amount_mode: AmountMode,
    #[sqlx(try_from = "String")]
    currency: Currency,
    is_active: bool,
    archived_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    donor_prefill: Option<serde_json::Value>,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SetAllocationRow {
    pub id: String,
    pub position: i32,
    pub amount_cents: i64,
    pub recipient_org_account_link_id: String,
    pub link_label: String,
    pub recipient_organisation_id: String,
    pub recipient_org_name: String,
    pub stripe_connect_account_id: String,
    pub charges_enabled: bool,
    pub link_is_active: bool,
    pub link_archived_at: Option<DateTime<Utc>>,
    pub distributor_organisation_id: String,
}

/// Why a set cannot take a payment now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetUnavailable {
    #[error("the recommendation set is not active")]
    Inactive,
    #[error("the recommendation set is archived")]
    Archived,
    #[error("the recommendation set expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("recipient account link '{link_id}' is not active")]
    LinkInactive { link_id: String },
    #[error("recipient account link '{link_id}' is archived")]
    LinkArchived { link_id: String },
}

impl RecommendationSetRow {
    /// The parts of the set the plan rules need.
    pub fn rules(&self) -> SetRules {
        SetRules {
            id: self.id.clone(),
            amount_mode: self.amount_mode,
            currency: self.currency,
            allocations: self
                .allocations
                .iter()
                .map(|a| SetAllocation {
                    id: a.id.clone(),
                    recipient_org_account_link_id: a.recipient_org_account_link_id.clone(),
                    amount_cents: a.amount_cents,
                })
                .collect(),
        }
    }

    /// Whether the set, and every link a payment would go to, can take a payment at `now`.
    /// `link_ids` are the links of the plan's lines (a zeroed-out recipient is not checked).
    pub fn check_available(&self, now: DateTime<Utc>, link_ids: &[&str]) -> Result<(), SetUnavailable> {
        if !self.is_active {
            return Err(SetUnavailable::Inactive);
        }
        if self.archived_at.is_some() {
            return Err(SetUnavailable::Archived);
        }
        if let Some(expires_at) = self.expires_at.filter(|&at| at <= now) {
            return Err(SetUnavailable::Expired(expires_at));
        }
        for allocation in self
            .allocations
            .iter()
            .filter(|a| link_ids.contains(&a.recipient_org_account_link_id.as_str()))
        {
            let link_id = allocation.recipient_org_account_link_id.clone();
            if allocation.link_archived_at.is_some() {
                return Err(SetUnavailable::LinkArchived { link_id });
            }
            if !allocation.link_is_active {
                return Err(SetUnavailable::LinkInactive { link_id });
            }
            // Not `charges_enabled`: it is Stripe's word once an `account.updated` came, and a transfers-only
            // recipient account (what splitpay needs) has it false for good; an account not ready yet is no reason
            // to refuse the donor either: its share parks and is retried when Stripe says the account can receive
            // transfers. The platform's switch is `is_active`.
        }
        Ok(())
    }
}

/// Writes a set and its allocations in one transaction, refusing what the platform would refuse: a link that is
/// not the set organisation's own, amounts out of range, OPEN sets with amounts, too many allocations.
pub async fn create_recommendation_set(
    tx: &mut Tx<'_>,
    set: &NewRecommendationSet,
) -> Result<RecommendationSetRow, StoreError> {
    if set.allocations.is_empty() || set.allocations.len() > ALLOCATIONS_PER_SET_MAX {
        return Err(StoreError::Invalid(format!(
            "allocations: a set needs 1 to {ALLOCATIONS_PER_SET_MAX} allocations, got {}",
            set.allocations.len()
        )));
    }
    for (i, allocation) in set.allocations.iter().enumerate() {
        if !(0..=ALLOCATION_AMOUNT_MAX_CENTS).contains(&allocation.amount_cents) {
            return Err(StoreError::Invalid(format!(
                "allocations[{i}].amount_cents: out of range"
            )));
        }
        if set.amount_mode == AmountMode::Open && allocation.amount_cents != 0 {
            return Err(StoreError::Invalid(format!(
                "allocations[{i}].amount_cents: must be 0 in an OPEN set"
            )));
        }
    }
    sqlx::query(
        "INSERT INTO recommendation_sets
            (id, organisation_id, name, slug, amount_mode, currency, expires_at, donor_prefill)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&set.id)
    .bind(&set.organisation_id)
    .bind(&set.name)
    .bind(&set.slug)
    .bind(set.amount_mode.as_str())
    .bind(set.currency.stripe_code())
    .bind(set.expires_at)
    .bind(&set.donor_prefill)
    .execute(&mut **tx)
    .await?;
    for (position, allocation) in set.allocations.iter().enumerate() {
        // The link must be one this organisation is authorised to direct funds to.
        let owned: Option<(String,)> =
            sqlx::query_as("SELECT id FROM recipient_account_links WHERE id = $1 AND distributor_organisation_id = $2")
                .bind(&allocation.recipient_org_account_link_id)
                .bind(&set.organisation_id)
                .fetch_optional(&mut **tx)
                .await?;
        if owned.is_none() {
            return Err(StoreError::Invalid(format!(
                "allocations[{position}].recipient_org_account_link_id: '{}' is not a link of organisation '{}'",
                allocation.recipient_org_account_link_id, set.organisation_id
            )));
        }
        sqlx::query(
            "INSERT INTO recommendation_allocations (id, recommendation_set_id, position, recipient_org_account_link_id, amount_cents)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&allocation.id)
        .bind(&set.id)
        .bind(position as i32)
        .bind(&allocation.recipient_org_account_link_id)
        .bind(allocation.amount_cents)
        .execute(&mut **tx)
        .await?;
    }
    get_recommendation_set(tx, &set.id).await
}

pub async fn get_recommendation_set(conn: &mut PgConnection, id: &str) -> Result<RecommendationSetRow, StoreError> {
    let head = sqlx::query_as::<_, SetHeadRow>("SELECT * FROM recommendation_sets WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "recommendation set",
            id: id.to_owned(),
        })?;
    let allocations = sqlx::query_as::<_, SetAllocationRow>(
        "SELECT a.id, a.position, a.amount_cents, a.recipient_org_account_link_id,
                l.label AS link_label, l.recipient_organisation_id, l.recipient_org_name,
                l.stripe_connect_account_id, l.charges_enabled, l.is_active AS link_is_active,
                l.archived_at AS link_archived_at, l.distributor_organisation_id
           FROM recommendation_allocations a
           JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
          WHERE a.recommendation_set_id = $1 AND a.removed_at IS NULL
          ORDER BY a.position",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(RecommendationSetRow {
        id: head.id,
        organisation_id: head.organisation_id,
        name: head.name,
        slug: head.slug,
        amount_mode: head.amount_mode,
        currency: head.currency,
        is_active: head.is_active,
        archived_at: head.archived_at,
        expires_at: head.expires_at,
        donor_prefill: head.donor_prefill,
        created_at: head.created_at,
        allocations,
    })
}

/// The platform deactivates or archives a set; splitpay then refuses new payments through it.
pub async fn set_recommendation_set_state(
    conn: &mut PgConnection,
    id: &str,
    is_active: bool,
    archived_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    let done = sqlx::query("UPDATE recommendation_sets SET is_active = $2, archived_at = $3 WHERE id = $1")
        .bind(id)
        .bind(is_active)
        .bind(archived_at)
        .execute(conn)
        .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound {
            what: "recommendation set",
            id: id.to_owned(),
        });
    }
    Ok(())
}

mod sets;
mod upsert;

pub use sets::{check_set_amounts, upsert_recommendation_set, SetUpsert};
pub use upsert::*;
