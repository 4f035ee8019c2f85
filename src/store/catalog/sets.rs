//! The catalogue API's writer for recommendation sets: the amount rules by mode, and the upsert that replaces a set
//! and its allocations in one transaction.

use super::upsert::{conflict, invalid, organisation_exists, unknown};
use super::*;

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
