//! The CSI SnapshotMetadata service (changed-block tracking) over the BlockData API.
//!
//! Blocks are FIXED_LENGTH, ServiceInfo.block_size bytes each. Every request is checked and
//! its first page fetched before the stream starts, so a bad request fails the call itself;
//! the stream then pages through the API and ends when the listing does or the client
//! goes away.

use std::future::Future;

use blockgate_proto::blockstore::v1 as bs;
use blockgate_proto::csi::v1 as csi;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::blockstore::BlockStore;
use crate::errors::{ApiError, CsiError, reply};
use crate::naming;

/// Responses buffered ahead of a slow client.
const STREAM_BUFFER: usize = 4;

#[derive(Debug)]
pub struct SnapshotMetadata {
    blockstore: BlockStore,
}

impl SnapshotMetadata {
    pub fn new(blockstore: BlockStore) -> SnapshotMetadata {
        SnapshotMetadata { blockstore }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("snapshot_id is required")]
    MissingSnapshotId,
    #[error("base_snapshot_id is required")]
    MissingBaseSnapshotId,
    #[error("target_snapshot_id is required")]
    MissingTargetSnapshotId,
    #[error("starting_offset {0} is negative")]
    NegativeOffset(i64),
    #[error("max_results {0} is negative")]
    NegativeMaxResults(i32),
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(String),
    #[error("starting_offset {offset} is beyond the volume's {size} bytes")]
    OffsetBeyondVolume { offset: u64, size: u64 },
    #[error("block listing refused")]
    Listing(#[source] Status),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for MetadataError {
    fn code(&self) -> Code {
        match self {
            Self::MissingSnapshotId
            | Self::MissingBaseSnapshotId
            | Self::MissingTargetSnapshotId
            | Self::NegativeOffset(_)
            | Self::NegativeMaxResults(_) => Code::InvalidArgument,
            Self::SnapshotNotFound(_) => Code::NotFound,
            Self::OffsetBeyondVolume { .. } => Code::OutOfRange,
            Self::Listing(status) => match status.code() {
                Code::NotFound => Code::NotFound,
                Code::OutOfRange => Code::OutOfRange,
                Code::InvalidArgument => Code::InvalidArgument,
                _ => Code::Internal,
            },
            Self::Api(error) => error.code(),
        }
    }
}

/// One page of block indices from the API.
struct Page {
    indices: Vec<u64>,
    next: Option<u64>,
    block_size: u64,
    volume_size: u64,
}

/// What a request asks for, checked.
struct Checked {
    start_index: u64,
    max_results: usize,
    block_size: u64,
}

impl SnapshotMetadata {
    async fn snapshot_size(&self, id: &str) -> Result<u64, MetadataError> {
        if !naming::is_valid_id(id) {
            return Err(MetadataError::SnapshotNotFound(id.to_owned()));
        }
        match self
            .blockstore
            .store()
            .get_snapshot(bs::GetSnapshotRequest { id: id.to_owned() })
            .await
        {
            Ok(snapshot) => Ok(snapshot.into_inner().size_bytes),
            Err(status) if status.code() == Code::NotFound => {
                Err(MetadataError::SnapshotNotFound(id.to_owned()))
            }
            Err(status) => Err(MetadataError::Api(ApiError::new("GetSnapshot", status))),
        }
    }

    async fn check(
        &self,
        snapshot_id: &str,
        starting_offset: i64,
        max_results: i32,
    ) -> Result<Checked, MetadataError> {
        let offset = u64::try_from(starting_offset)
            .map_err(|_| MetadataError::NegativeOffset(starting_offset))?;
        let max_results = usize::try_from(max_results)
            .map_err(|_| MetadataError::NegativeMaxResults(max_results))?;
        let info = self
            .blockstore
            .service_info()
            .await
            .map_err(|status| MetadataError::Api(ApiError::new("GetServiceInfo", status)))?;
        let size = self.snapshot_size(snapshot_id).await?;
        if offset >= size {
            return Err(MetadataError::OffsetBeyondVolume { offset, size });
        }
        let block_size = u64::from(info.block_size).max(1);
        Ok(Checked {
            start_index: offset / block_size,
            max_results,
            block_size,
        })
    }
}

async fn list_allocated(
    blockstore: BlockStore,
    snapshot_id: String,
    start: u64,
    max_results: u32,
) -> Result<Page, Status> {
    let page = blockstore
        .data()
        .list_snapshot_blocks(bs::ListSnapshotBlocksRequest {
            snapshot_id,
            starting_block_index: start,
            max_results,
        })
        .await?
        .into_inner();
    Ok(Page {
        indices: page.blocks.iter().map(|block| block.block_index).collect(),
        next: page.next_block_index,
        block_size: u64::from(page.block_size),
        volume_size: page.volume_size,
    })
}

async fn list_changed(
    blockstore: BlockStore,
    first: String,
    second: String,
    start: u64,
    max_results: u32,
) -> Result<Page, Status> {
    let page = blockstore
        .data()
        .list_changed_blocks(bs::ListChangedBlocksRequest {
            first_snapshot_id: first,
            second_snapshot_id: second,
            starting_block_index: start,
            max_results,
        })
        .await?
        .into_inner();
    Ok(Page {
        indices: page
            .changed_blocks
            .iter()
            .map(|block| block.block_index)
            .collect(),
        next: page.next_block_index,
        block_size: u64::from(page.block_size),
        volume_size: page.volume_size,
    })
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Streams `first` and the pages after it as responses built by `make(capacity, blocks)`,
/// at most `max_results` blocks each (zero: as the API pages them).
fn stream_pages<R, F, Fut>(
    first: Page,
    checked: Checked,
    mut fetch: F,
    make: fn(i64, Vec<csi::BlockMetadata>) -> R,
) -> ReceiverStream<Result<R, Status>>
where
    R: Send + 'static,
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Page, Status>> + Send,
{
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let mut page = first;
        let mut first_message = true;
        loop {
            let block_size = if page.block_size == 0 {
                checked.block_size
            } else {
                page.block_size
            };
            let blocks: Vec<csi::BlockMetadata> = page
                .indices
                .iter()
                .map(|index| csi::BlockMetadata {
                    byte_offset: to_i64(index.saturating_mul(block_size)),
                    size_bytes: to_i64(block_size),
                })
                .collect();
            let chunk = if checked.max_results == 0 {
                blocks.len().max(1)
            } else {
                checked.max_results
            };
            let capacity = to_i64(page.volume_size);
            // The first message always goes out, so even an empty listing says the capacity.
            let messages: Vec<Vec<csi::BlockMetadata>> = if blocks.is_empty() {
                if first_message {
                    vec![Vec::new()]
                } else {
                    Vec::new()
                }
            } else {
                blocks.chunks(chunk).map(<[_]>::to_vec).collect()
            };
            for message in messages {
                first_message = false;
                if sender.send(Ok(make(capacity, message))).await.is_err() {
                    return; // the client went away
                }
            }
            let Some(next) = page.next else {
                return;
            };
            page = match fetch(next).await {
                Ok(page) => page,
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "block listing failed mid-stream");
                    let _ = sender.send(Err(status)).await;
                    return;
                }
            };
        }
    });
    ReceiverStream::new(receiver)
}

fn api_page_size(max_results: usize) -> u32 {
    u32::try_from(max_results).unwrap_or(u32::MAX)
}

impl SnapshotMetadata {
    async fn allocated(
        &self,
        request: csi::GetMetadataAllocatedRequest,
    ) -> Result<ReceiverStream<Result<csi::GetMetadataAllocatedResponse, Status>>, MetadataError>
    {
        if request.snapshot_id.is_empty() {
            return Err(MetadataError::MissingSnapshotId);
        }
        let checked = self
            .check(
                &request.snapshot_id,
                request.starting_offset,
                request.max_results,
            )
            .await?;
        let page_size = api_page_size(checked.max_results);
        let first = list_allocated(
            self.blockstore.clone(),
            request.snapshot_id.clone(),
            checked.start_index,
            page_size,
        )
        .await
        .map_err(MetadataError::Listing)?;
        let blockstore = self.blockstore.clone();
        let snapshot_id = request.snapshot_id;
        Ok(stream_pages(
            first,
            checked,
            move |start| list_allocated(blockstore.clone(), snapshot_id.clone(), start, page_size),
            |capacity, blocks| csi::GetMetadataAllocatedResponse {
                block_metadata_type: csi::BlockMetadataType::FixedLength.into(),
                volume_capacity_bytes: capacity,
                block_metadata: blocks,
            },
        ))
    }

    async fn delta(
        &self,
        request: csi::GetMetadataDeltaRequest,
    ) -> Result<ReceiverStream<Result<csi::GetMetadataDeltaResponse, Status>>, MetadataError> {
        if request.base_snapshot_id.is_empty() {
            return Err(MetadataError::MissingBaseSnapshotId);
        }
        if request.target_snapshot_id.is_empty() {
            return Err(MetadataError::MissingTargetSnapshotId);
        }
        self.snapshot_size(&request.base_snapshot_id).await?;
        let checked = self
            .check(
                &request.target_snapshot_id,
                request.starting_offset,
                request.max_results,
            )
            .await?;
        let page_size = api_page_size(checked.max_results);
        let first = list_changed(
            self.blockstore.clone(),
            request.base_snapshot_id.clone(),
            request.target_snapshot_id.clone(),
            checked.start_index,
            page_size,
        )
        .await
        .map_err(MetadataError::Listing)?;
        let blockstore = self.blockstore.clone();
        let (base, target) = (request.base_snapshot_id, request.target_snapshot_id);
        Ok(stream_pages(
            first,
            checked,
            move |start| {
                list_changed(
                    blockstore.clone(),
                    base.clone(),
                    target.clone(),
                    start,
                    page_size,
                )
            },
            |capacity, blocks| csi::GetMetadataDeltaResponse {
                block_metadata_type: csi::BlockMetadataType::FixedLength.into(),
                volume_capacity_bytes: capacity,
                block_metadata: blocks,
            },
        ))
    }
}

#[tonic::async_trait]
impl csi::snapshot_metadata_server::SnapshotMetadata for SnapshotMetadata {
    type GetMetadataAllocatedStream =
        ReceiverStream<Result<csi::GetMetadataAllocatedResponse, Status>>;
    type GetMetadataDeltaStream = ReceiverStream<Result<csi::GetMetadataDeltaResponse, Status>>;

    async fn get_metadata_allocated(
        &self,
        request: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        use tracing::Instrument as _;
        let request = request.into_inner();
        let span = tracing::info_span!("GetMetadataAllocated", object = %request.snapshot_id);
        async { reply("GetMetadataAllocated", self.allocated(request).await) }
            .instrument(span)
            .await
    }

    async fn get_metadata_delta(
        &self,
        request: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        use tracing::Instrument as _;
        let request = request.into_inner();
        let span = tracing::info_span!(
            "GetMetadataDelta",
            object = %format!("{}..{}", request.base_snapshot_id, request.target_snapshot_id)
        );
        async { reply("GetMetadataDelta", self.delta(request).await) }
            .instrument(span)
            .await
    }
}
