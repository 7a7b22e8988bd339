//! The signed-in owner's OAuth2 clients: `GET`, `POST /v1/clients`, `DELETE
//! /v1/clients/{id}` (revokes the client and every token it holds).

use axum::response::Response;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::fail::{Fail, Input, Json};
use super::{private, KeyPath, Session};
use crate::store::{ClientStore, NewClient, OAuthClient, StoreError};

/// A client as its owner sees it; never its secret.
#[derive(Debug, Serialize)]
pub(crate) struct ClientView {
    id: String,
    name: String,
    scopes: Vec<String>,
    created_at: Option<String>,
    active: bool,
}

impl ClientView {
    fn of(client: &OAuthClient) -> Self {
        Self {
            id: client.id.clone(),
            name: client.name.clone(),
            scopes: client.scopes.iter().map(str::to_owned).collect(),
            created_at: client.created_at.map(super::views::time),
            active: client.active,
        }
    }
}

#[derive(Serialize)]
struct ClientList {
    clients: Vec<ClientView>,
}

#[derive(Serialize)]
struct CreatedView<'a> {
    client: ClientView,
    client_secret: &'a str,
}

/// `POST /v1/clients`.
#[derive(Debug, Deserialize)]
pub(crate) struct CreateClient {
    name: String,
    scopes: Option<Vec<String>>,
}

impl Input for CreateClient {
    const FIELDS: &'static [&'static str] = &["name", "scopes"];
}

pub(crate) async fn list<S: ClientStore + Send + Sync + 'static>(
    session: Session<S>,
) -> Result<Response, Fail> {
    let clients = session.store.clients(&session.owner.name).await?;
    let clients = clients.iter().map(ClientView::of).collect();
    Ok(private(StatusCode::OK, &ClientList { clients }))
}

pub(crate) async fn create<S: ClientStore + Send + Sync + 'static>(
    session: Session<S>,
    Json(body): Json<CreateClient>,
) -> Result<Response, Fail> {
    let mut new = NewClient::new(session.owner.name.clone(), body.name);
    if let Some(scopes) = body.scopes {
        super::views::check_words("scopes", "scope", &scopes)?;
        new.scopes = scopes.iter().map(String::as_str).collect();
    }
    let created = session.store.create_client(new).await?;
    Ok(private(
        StatusCode::CREATED,
        &CreatedView {
            client: ClientView::of(&created.client),
            client_secret: created.secret.expose_secret(),
        },
    ))
}

/// `DELETE /v1/clients/{id}`: 204; another owner's client is a 404 like an unknown one.
pub(crate) async fn revoke<S: ClientStore + Send + Sync + 'static>(
    session: Session<S>,
    KeyPath(id): KeyPath,
) -> Result<StatusCode, Fail> {
    let client = match session.store.client(&id).await {
        Ok(client) if client.owner == session.owner.name => client,
        Ok(_) | Err(StoreError::ClientNotFound(_)) => {
            return Err(Fail::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "No such client.",
            ))
        }
        Err(other) => return Err(other.into()),
    };
    session.store.revoke_client(&client.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
