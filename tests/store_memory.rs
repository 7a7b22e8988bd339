//! The conformance suite on `MemoryStore` (two handles: clones of one store).

mod conformance;

use keygate::store::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() {
    conformance::run(|clock| async move {
        let store = MemoryStore::builder().clock(clock).build();
        (store.clone(), store)
    })
    .await;
}
