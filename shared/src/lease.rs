//! The lease rules every service applies to a worker's request (DESIGN §3): which
//! workstation a credential may act for, and whether a write under a lease may be
//! applied to a step. The services read the step row (under a lock where it
//! matters) and ask here; the compare-and-swap statements in the lease service
//! encode the same conditions in SQL.
//!
//! Precedence of the answers, from the caller's point of view:
//! 1. `not_found` — no such step in the caller's organisation (another
//!    organisation's step is indistinguishable from a missing one);
//! 2. `forbidden` — the step targets another workstation than the one the
//!    credential is bound to (or the caller holds no workstation credential);
//! 3. `stale_lease` — the step is no longer executing at this generation for
//!    this owner: the writer lost the lease and must stop.

use crate::error::{ErrorCode, WireError};
use crate::ids::{OrgId, StepId, WorkstationId};
use crate::model::StepStatus;
use crate::protocol::Principal;

/// A step's lease as stored in Postgres.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredLease<'a> {
    pub step_id: StepId,
    pub org_id: OrgId,
    pub workstation_id: WorkstationId,
    pub status: StepStatus,
    pub generation: i64,
    /// The worker holding the lease (`None` once it ended).
    pub owner: Option<&'a str>,
}

/// What a worker's write claims: who sends it and under which generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseWrite<'a> {
    pub generation: i64,
    pub worker_id: &'a str,
}

/// The workstation a caller acts for: its credential's binding. Only a workstation
/// credential (issued by `workstations.register`) may claim, renew, release or
/// write for steps; an organisation token of any role may not.
pub fn acting_workstation(principal: &Principal) -> Result<WorkstationId, WireError> {
    principal.workstation_id.ok_or_else(|| {
        WireError::new(
            ErrorCode::Forbidden,
            "this subject needs a workstation credential: enrol the workstation with \
             `workstations.register` and use the credential it returns",
        )
    })
}

/// Ok when `principal` may act on a step of `org` targeting `workstation`.
/// Another organisation's step is reported as missing, never as forbidden.
pub fn check_step_access(
    principal: &Principal,
    step_id: StepId,
    org: OrgId,
    workstation: WorkstationId,
) -> Result<(), WireError> {
    if org != principal.org_id {
        return Err(WireError::not_found(format!("no step {step_id}")));
    }
    let mine = acting_workstation(principal)?;
    if mine != workstation {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            format!("step {step_id} targets another workstation; this credential is bound to workstation {mine}"),
        ));
    }
    Ok(())
}

/// Ok when a write under `write` may be applied to the step: the caller's
/// workstation is the step's, and the step is executing at exactly this
/// generation for exactly this owner (compare-and-swap on the fencing token).
pub fn check_write(principal: &Principal, lease: &StoredLease<'_>, write: &LeaseWrite<'_>) -> Result<(), WireError> {
    check_step_access(principal, lease.step_id, lease.org_id, lease.workstation_id)?;
    let holds = lease.status == StepStatus::Executing
        && lease.generation == write.generation
        && lease.owner == Some(write.worker_id);
    if holds {
        return Ok(());
    }
    let why = if lease.status != StepStatus::Executing {
        format!("is {}", lease.status)
    } else if lease.generation != write.generation {
        format!("is at lease generation {}", lease.generation)
    } else {
        "is leased by another worker".to_string()
    };
    Err(WireError::stale_lease(format!(
        "step {} {why}; this write carried generation {} from this worker: it no longer holds the lease",
        lease.step_id, write.generation
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    fn principal(org: OrgId, ws: Option<WorkstationId>) -> Principal {
        Principal {
            org_id: org,
            token_id: uuid::Uuid::nil(),
            token_name: "ws".into(),
            role: Role::Worker,
            workstation_id: ws,
            scopes: Vec::new(),
        }
    }

    fn lease(org: OrgId, ws: WorkstationId) -> StoredLease<'static> {
        StoredLease {
            step_id: StepId::new(),
            org_id: org,
            workstation_id: ws,
            status: StepStatus::Executing,
            generation: 3,
            owner: Some("a-1"),
        }
    }

    const W: LeaseWrite<'static> = LeaseWrite {
        generation: 3,
        worker_id: "a-1",
    };

    #[test]
    fn the_holder_may_write() {
        let (org, ws) = (OrgId::new(), WorkstationId::new());
        assert_eq!(check_write(&principal(org, Some(ws)), &lease(org, ws), &W), Ok(()));
    }

    #[test]
    fn another_organisation_sees_nothing() {
        let (org, ws) = (OrgId::new(), WorkstationId::new());
        let e = check_write(&principal(OrgId::new(), Some(ws)), &lease(org, ws), &W).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn another_workstation_is_forbidden_even_with_the_right_generation_and_owner() {
        let (org, ws) = (OrgId::new(), WorkstationId::new());
        let e = check_write(&principal(org, Some(WorkstationId::new())), &lease(org, ws), &W).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("another workstation"), "{}", e.message);
    }

    #[test]
    fn an_unbound_token_is_forbidden() {
        let (org, ws) = (OrgId::new(), WorkstationId::new());
        let mut p = principal(org, None);
        for role in [Role::Worker, Role::Admin, Role::Owner] {
            p.role = role;
            let e = check_write(&p, &lease(org, ws), &W).unwrap_err();
            assert_eq!(e.code, ErrorCode::Forbidden, "{role}");
            assert!(e.message.contains("workstations.register"), "{}", e.message);
        }
    }

    #[test]
    fn generation_owner_and_status_must_all_match() {
        let (org, ws) = (OrgId::new(), WorkstationId::new());
        let p = principal(org, Some(ws));
        let base = lease(org, ws);
        let cases = [
            ("generation", StoredLease { generation: 4, ..base }),
            (
                "owner",
                StoredLease {
                    owner: Some("a-2"),
                    ..base
                },
            ),
            ("no owner", StoredLease { owner: None, ..base }),
            (
                "status",
                StoredLease {
                    status: StepStatus::Succeeded,
                    ..base
                },
            ),
        ];
        for (what, l) in cases {
            let e = check_write(&p, &l, &W).unwrap_err();
            assert_eq!(e.code, ErrorCode::StaleLease, "{what}");
        }
    }
}
