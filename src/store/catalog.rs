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
    #[error("recipient account link '{link_id}' cannot take payments (charges not enabled)")]
    LinkChargesDisabled { link_id: String },
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
            if !allocation.charges_enabled {
                return Err(SetUnavailable::LinkChargesDisabled { link_id });
            }
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

// ---- The catalogue API's writers: idempotent upserts (issue 9, point 4) ----

/// What an upsert did. An upsert that would change nothing writes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    Created,
    Updated,
    Unchanged,
}

/// Why the catalogue refused a write. Each names the field (`param`) it is about; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The input breaks a rule (`validation_failed`).
    #[error("{param}: {message}")]
    Invalid { param: String, message: String },
    /// The input names something that does not exist or is not the caller's to name (`invalid_request`).
    #[error("{param}: {message}")]
    UnknownReference { param: String, message: String },
    /// The input contradicts what exists and cannot change (`conflict`).
    #[error("{param}: {message}")]
    Conflict { param: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for CatalogError {
    fn from(e: sqlx::Error) -> Self {
        CatalogError::Store(e.into())
    }
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> CatalogError {
    CatalogError::Invalid {
        param: param.into(),
        message: message.into(),
    }
}

fn unknown(param: impl Into<String>, message: impl Into<String>) -> CatalogError {
    CatalogError::UnknownReference {
        param: param.into(),
        message: message.into(),
    }
}

fn conflict(param: impl Into<String>, message: impl Into<String>) -> CatalogError {
    CatalogError::Conflict {
        param: param.into(),
        message: message.into(),
    }
}

/// Creates the organisation or renames it.
pub async fn upsert_organisation(conn: &mut PgConnection, org: &NewOrganisation) -> Result<Upserted, CatalogError> {
    if org.name.trim().is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    // `xmax = 0` only on a freshly inserted row; no row back means the WHERE found nothing to change.
    let row: Option<(bool,)> = sqlx::query_as(
        "INSERT INTO organisations (id, name) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name WHERE organisations.name IS DISTINCT FROM EXCLUDED.name
         RETURNING (xmax = 0)",
    )
    .bind(&org.id)
    .bind(&org.name)
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some((true,)) => Upserted::Created,
        Some((false,)) => Upserted::Updated,
        None => Upserted::Unchanged,
    })
}

/// The ids of the links an organisation distributes to, in id order.
pub async fn links_of_distributor(conn: &mut PgConnection, organisation_id: &str) -> Result<Vec<String>, StoreError> {
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM recipient_account_links WHERE distributor_organisation_id = $1 ORDER BY id")
            .bind(organisation_id)
            .fetch_all(conn)
            .await?;
    Ok(ids.into_iter().map(|(id,)| id).collect())
}

/// A link as the platform sends it; `is_active: None` keeps the current flag (true for a new link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkUpsert {
    pub id: String,
    pub distributor_organisation_id: String,
    pub recipient_organisation_id: String,
    pub recipient_org_name: String,
    pub label: String,
    pub stripe_connect_account_id: String,
    /// `None` keeps the current flag (false for a new link); Stripe's `account.updated` also sets it.
    pub charges_enabled: Option<bool>,
    pub is_active: Option<bool>,
}

pub fn is_connected_account_id(raw: &str) -> bool {
    raw.strip_prefix("acct_")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

async fn organisation_exists(conn: &mut PgConnection, id: &str) -> Result<bool, StoreError> {
    let row: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM organisations WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(row.is_some())
}

/// Creates or updates a link. Its distributor never changes (sets name it as theirs); an archived link is final.
pub async fn upsert_link(tx: &mut Tx<'_>, link: &LinkUpsert) -> Result<(Upserted, LinkRow), CatalogError> {
    if link.label.trim().is_empty() {
        return Err(invalid("label", "must not be empty"));
    }
    if link.recipient_org_name.trim().is_empty() {
        return Err(invalid("recipient_org_name", "must not be empty"));
    }
    if !is_connected_account_id(&link.stripe_connect_account_id) {
        return Err(invalid(
            "stripe_connect_account_id",
            "must be a Stripe connected account id (acct_…)",
        ));
    }
    if link.distributor_organisation_id == link.recipient_organisation_id {
        return Err(invalid(
            "recipient_organisation_id",
            "a link goes from a distributor to another organisation",
        ));
    }
    for (param, org) in [
        ("distributor_organisation_id", &link.distributor_organisation_id),
        ("recipient_organisation_id", &link.recipient_organisation_id),
    ] {
        if !organisation_exists(tx, org).await? {
            return Err(unknown(param, format!("organisation '{org}' is unknown")));
        }
    }
    let current = sqlx::query_as::<_, LinkRow>("SELECT * FROM recipient_account_links WHERE id = $1 FOR UPDATE")
        .bind(&link.id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(current) = current else {
        let row = create_link(
            tx,
            &NewLink {
                id: link.id.clone(),
                distributor_organisation_id: link.distributor_organisation_id.clone(),
                recipient_organisation_id: link.recipient_organisation_id.clone(),
                recipient_org_name: link.recipient_org_name.clone(),
                label: link.label.clone(),
                stripe_connect_account_id: link.stripe_connect_account_id.clone(),
                charges_enabled: link.charges_enabled.unwrap_or(false),
                is_active: link.is_active.unwrap_or(true),
            },
        )
        .await?;
        return Ok((Upserted::Created, row));
    };
    if current.distributor_organisation_id != link.distributor_organisation_id {
        return Err(conflict(
            "distributor_organisation_id",
            format!(
                "link '{}' belongs to organisation '{}'; a link's distributor never changes",
                link.id, current.distributor_organisation_id
            ),
        ));
    }
    if current.archived_at.is_some() {
        return Err(conflict("id", format!("link '{}' is archived", link.id)));
    }
    let is_active = link.is_active.unwrap_or(current.is_active);
    let charges_enabled = link.charges_enabled.unwrap_or(current.charges_enabled);
    let unchanged = current.recipient_organisation_id == link.recipient_organisation_id
        && current.recipient_org_name == link.recipient_org_name
        && current.label == link.label
        && current.stripe_connect_account_id == link.stripe_connect_account_id
        && current.charges_enabled == charges_enabled
        && current.is_active == is_active;
    if unchanged {
        return Ok((Upserted::Unchanged, current));
    }
    let row = sqlx::query_as::<_, LinkRow>(
        "UPDATE recipient_account_links
            SET recipient_organisation_id = $2, recipient_org_name = $3, label = $4, stripe_connect_account_id = $5,
                charges_enabled = $6, is_active = $7, updated_at = now()
          WHERE id = $1
         RETURNING *",
    )
    .bind(&link.id)
    .bind(&link.recipient_organisation_id)
    .bind(&link.recipient_org_name)
    .bind(&link.label)
    .bind(&link.stripe_connect_account_id)
    .bind(charges_enabled)
    .bind(is_active)
    .fetch_one(&mut **tx)
    .await?;
    Ok((Upserted::Updated, row))
}

/// Deactivates (`archive: false`) or archives a link; repeating either changes nothing.
pub async fn retire_link(conn: &mut PgConnection, id: &str, archive: bool) -> Result<(Upserted, LinkRow), StoreError> {
    let sql = if archive {
        "UPDATE recipient_account_links SET archived_at = now(), updated_at = now()
          WHERE id = $1 AND archived_at IS NULL RETURNING *"
    } else {
        "UPDATE recipient_account_links SET is_active = false, updated_at = now()
          WHERE id = $1 AND is_active RETURNING *"
    };
    match sqlx::query_as::<_, LinkRow>(sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    {
        Some(row) => Ok((Upserted::Updated, row)),
        None => Ok((Upserted::Unchanged, get_link(conn, id).await?)),
    }
}

/// Deactivates (`archive: false`) or archives a set; repeating either changes nothing.
pub async fn retire_recommendation_set(
    conn: &mut PgConnection,
    id: &str,
    archive: bool,
) -> Result<(Upserted, RecommendationSetRow), StoreError> {
    let sql = if archive {
        "UPDATE recommendation_sets SET archived_at = now() WHERE id = $1 AND archived_at IS NULL"
    } else {
        "UPDATE recommendation_sets SET is_active = false WHERE id = $1 AND is_active"
    };
    let done = sqlx::query(sql).bind(id).execute(&mut *conn).await?;
    let set = get_recommendation_set(conn, id).await?;
    let outcome = if done.rows_affected() > 0 {
        Upserted::Updated
    } else {
        Upserted::Unchanged
    };
    Ok((outcome, set))
}

/// A set as the platform sends it: the allocations in display order. `is_active: None` keeps the current flag.
/// The amounts are already checked against the mode and the currency against the settlement currencies (see
/// [`check_set_amounts`]); this checks what needs the database.
#[derive(Debug, Clone, PartialEq)]
pub struct SetUpsert {
    pub set: NewRecommendationSet,
    pub is_active: Option<bool>,
}

/// The amount rules of a set's allocations, by mode: FIXED amounts are positive (and at least the minimum a payment
/// takes, or the set could never be paid), OPEN amounts are 0, SUGGESTED amounts are 0 or more; each link once.
pub fn check_set_amounts(
    mode: AmountMode,
    allocations: &[NewSetAllocation],
    min_allocation_cents: i64,
) -> Result<(), CatalogError> {
    if allocations.is_empty() || allocations.len() > ALLOCATIONS_PER_SET_MAX {
        return Err(invalid(
            "allocations",
            format!(
                "a set needs 1 to {ALLOCATIONS_PER_SET_MAX} allocations, got {}",
                allocations.len()
            ),
        ));
    }
    for (i, a) in allocations.iter().enumerate() {
        let param = format!("allocations[{i}].amount_cents");
        if !(0..=ALLOCATION_AMOUNT_MAX_CENTS).contains(&a.amount_cents) {
            return Err(invalid(
                param,
                format!("must be between 0 and {ALLOCATION_AMOUNT_MAX_CENTS}"),
            ));
        }
        match mode {
            AmountMode::Fixed if a.amount_cents <= 0 => {
                return Err(invalid(param, "must be greater than 0 in a FIXED set"))
            }
            AmountMode::Fixed if a.amount_cents < min_allocation_cents => {
                return Err(invalid(
                    param,
                    format!("must be at least {min_allocation_cents} (the minimum allocation) in a FIXED set"),
                ))
            }
            AmountMode::Open if a.amount_cents != 0 => return Err(invalid(param, "must be 0 in an OPEN set")),
            _ => {}
        }
        if allocations[..i].iter().any(|b| b.id == a.id) {
            return Err(invalid(
                format!("allocations[{i}].id"),
                format!("'{}' appears twice", a.id),
            ));
        }
        if allocations[..i]
            .iter()
            .any(|b| b.recipient_org_account_link_id == a.recipient_org_account_link_id)
        {
            return Err(invalid(
                format!("allocations[{i}].recipient_org_account_link_id"),
                format!("link '{}' appears twice in the set", a.recipient_org_account_link_id),
            ));
        }
    }
    if mode != AmountMode::Open && allocations.iter().all(|a| a.amount_cents == 0) {
        return Err(invalid("allocations", "at least one amount must be positive"));
    }
    Ok(())
}

/// Creates or replaces a set and its allocations, in one transaction (the caller's).
///
/// Allocations are matched by id. One the new list drops is marked `removed_at` (never deleted: payments may
/// reference it, and keep their own amounts and link whatever happens here); one the list names again is restored.
/// A set's organisation never changes; an archived set is final; an allocation id belongs to one set, and one that
/// payments reference keeps its link (a new recipient needs a new allocation).
pub async fn upsert_recommendation_set(
    tx: &mut Tx<'_>,
    upsert: &SetUpsert,
) -> Result<(Upserted, RecommendationSetRow), CatalogError> {
    let set = &upsert.set;
    if set.name.trim().is_empty() || set.name.chars().count() > 500 {
        return Err(invalid("name", "must be 1 to 500 characters"));
    }
    if set.slug.trim().is_empty() {
        return Err(invalid("slug", "must not be empty"));
    }
    if !organisation_exists(tx, &set.organisation_id).await? {
        return Err(unknown(
            "organisation_id",
            format!("organisation '{}' is unknown", set.organisation_id),
        ));
    }
    // Every link must be the set organisation's own, and not archived.
    for (i, a) in set.allocations.iter().enumerate() {
        let param = format!("allocations[{i}].recipient_org_account_link_id");
        let link: Option<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT distributor_organisation_id, archived_at FROM recipient_account_links WHERE id = $1",
        )
        .bind(&a.recipient_org_account_link_id)
        .fetch_optional(&mut **tx)
        .await?;
        match link {
            Some((distributor, archived_at)) if distributor == set.organisation_id => {
                if archived_at.is_some() {
                    return Err(invalid(
                        param,
                        format!("link '{}' is archived", a.recipient_org_account_link_id),
                    ));
                }
            }
            _ => {
                return Err(unknown(
                    param,
                    format!(
                        "'{}' is not a recipient account link of organisation '{}'",
                        a.recipient_org_account_link_id, set.organisation_id
                    ),
                ))
            }
        }
        let elsewhere: Option<(String,)> =
            sqlx::query_as("SELECT recommendation_set_id FROM recommendation_allocations WHERE id = $1")
                .bind(&a.id)
                .fetch_optional(&mut **tx)
                .await?;
        if let Some((other,)) = elsewhere.filter(|(other,)| *other != set.id) {
            return Err(conflict(
                format!("allocations[{i}].id"),
                format!("allocation '{}' belongs to recommendation set '{other}'", a.id),
            ));
        }
    }

    let created: Option<(String,)> = sqlx::query_as(
        "INSERT INTO recommendation_sets
            (id, organisation_id, name, slug, amount_mode, currency, is_active, expires_at, donor_prefill)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(&set.id)
    .bind(&set.organisation_id)
    .bind(&set.name)
    .bind(&set.slug)
    .bind(set.amount_mode.as_str())
    .bind(set.currency.stripe_code())
    .bind(upsert.is_active.unwrap_or(true))
    .bind(set.expires_at)
    .bind(&set.donor_prefill)
    .fetch_optional(&mut **tx)
    .await
    .map_err(slug_taken)?;
    let outcome = if created.is_some() {
        Upserted::Created
    } else {
        let head = sqlx::query_as::<_, SetHeadRow>("SELECT * FROM recommendation_sets WHERE id = $1 FOR UPDATE")
            .bind(&set.id)
            .fetch_one(&mut **tx)
            .await?;
        if head.organisation_id != set.organisation_id {
            return Err(conflict(
                "organisation_id",
                format!(
                    "recommendation set '{}' belongs to organisation '{}'; a set's organisation never changes",
                    set.id, head.organisation_id
                ),
            ));
        }
        if head.archived_at.is_some() {
            return Err(conflict("id", format!("recommendation set '{}' is archived", set.id)));
        }
        let current = get_recommendation_set(tx, &set.id).await?;
        let is_active = upsert.is_active.unwrap_or(head.is_active);
        let same_allocations = current.allocations.len() == set.allocations.len()
            && current.allocations.iter().zip(&set.allocations).all(|(c, n)| {
                c.id == n.id
                    && c.recipient_org_account_link_id == n.recipient_org_account_link_id
                    && c.amount_cents == n.amount_cents
            });
        let same_head = head.name == set.name
            && head.slug == set.slug
            && head.amount_mode == set.amount_mode
            && head.currency == set.currency
            && head.is_active == is_active
            && head.expires_at == set.expires_at
            && head.donor_prefill == set.donor_prefill;
        if same_head && same_allocations {
            return Ok((Upserted::Unchanged, current));
        }
        sqlx::query(
            "UPDATE recommendation_sets
                SET name = $2, slug = $3, amount_mode = $4, currency = $5, is_active = $6, expires_at = $7,
                    donor_prefill = $8
              WHERE id = $1",
        )
        .bind(&set.id)
        .bind(&set.name)
        .bind(&set.slug)
        .bind(set.amount_mode.as_str())
        .bind(set.currency.stripe_code())
        .bind(is_active)
        .bind(set.expires_at)
        .bind(&set.donor_prefill)
        .execute(&mut **tx)
        .await
        .map_err(slug_taken)?;
        Upserted::Updated
    };

    // Every current allocation is set aside, then the list is written back in order: the position and link-once
    // rules hold among allocations not removed, so reordering never collides with itself.
    sqlx::query(
        "UPDATE recommendation_allocations SET removed_at = now() WHERE recommendation_set_id = $1 AND removed_at IS NULL",
    )
    .bind(&set.id)
    .execute(&mut **tx)
    .await?;
    for (position, a) in set.allocations.iter().enumerate() {
        let relinked_with_payments: Option<(String,)> = sqlx::query_as(
            "SELECT r.recipient_org_account_link_id FROM recommendation_allocations r
              WHERE r.id = $1 AND r.recipient_org_account_link_id <> $2
                AND EXISTS (SELECT 1 FROM split_allocations s WHERE s.recommendation_allocation_id = r.id)",
        )
        .bind(&a.id)
        .bind(&a.recipient_org_account_link_id)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some((old_link,)) = relinked_with_payments {
            return Err(conflict(
                format!("allocations[{position}].recipient_org_account_link_id"),
                format!(
                    "allocation '{}' went to link '{old_link}' in payments already made; give another recipient a \
                     new allocation id",
                    a.id
                ),
            ));
        }
        sqlx::query(
            "INSERT INTO recommendation_allocations
                (id, recommendation_set_id, position, recipient_org_account_link_id, amount_cents)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE
                SET position = EXCLUDED.position,
                    recipient_org_account_link_id = EXCLUDED.recipient_org_account_link_id,
                    amount_cents = EXCLUDED.amount_cents, removed_at = NULL",
        )
        .bind(&a.id)
        .bind(&set.id)
        .bind(position as i32)
        .bind(&a.recipient_org_account_link_id)
        .bind(a.amount_cents)
        .execute(&mut **tx)
        .await?;
    }
    Ok((outcome, get_recommendation_set(tx, &set.id).await?))
}

fn slug_taken(e: sqlx::Error) -> CatalogError {
    match &e {
        sqlx::Error::Database(d) if d.constraint() == Some("sets_slug_unique_per_org") => {
            conflict("slug", "another recommendation set of this organisation has this slug")
        }
        _ => e.into(),
    }
}
