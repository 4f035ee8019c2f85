//! The catalogue API's writers for organisations and links (issue 9, point 4): idempotent upserts, retiring links
//! and sets, and the refusals they share, each naming its field.

use super::*;

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

pub(super) fn invalid(param: impl Into<String>, message: impl Into<String>) -> CatalogError {
    CatalogError::Invalid {
        param: param.into(),
        message: message.into(),
    }
}

pub(super) fn unknown(param: impl Into<String>, message: impl Into<String>) -> CatalogError {
    CatalogError::UnknownReference {
        param: param.into(),
        message: message.into(),
    }
}

pub(super) fn conflict(param: impl Into<String>, message: impl Into<String>) -> CatalogError {
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

pub(super) async fn organisation_exists(conn: &mut PgConnection, id: &str) -> Result<bool, StoreError> {
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
