//! The device-facing client protocol under `/api/v1`.

use actix_web::{HttpResponse, web};
use keygate_sdk::wire::ApplianceInfo;

use crate::server::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::scope("/api/v1").route("/appliance", web::get().to(appliance)));
}

/// `GET /api/v1/appliance`: who this appliance is and what time it has.
async fn appliance(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ApplianceInfo {
        installation_id: state.appliance.installation_id().to_string(),
        public_key: state.appliance.public_key_b64().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        time: state.clock.now(),
    })
}
