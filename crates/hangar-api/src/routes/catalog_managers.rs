//! `/catalog-managers/...`: per-user remote catalogs (reference §1.5).

use crate::Api;

pub fn register(api: Api) -> Api {
    api
}
