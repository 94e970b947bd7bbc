//! Opening an image: header, tables and refcounts checked or rebuilt, the writable state
//! set up (dirty bit, journal replay, free bitmap).

use super::*;

impl Qcow2Shared {
    /// Opens an image file; `depth` counts backing levels above it. `journal` applies to a
    /// writable image only.
    pub(super) fn open(
        path: &Path,
        read_only: bool,
        depth: u32,
        journal: &JournalMode,
        recorder: Option<&Arc<Recorder>>,
    ) -> Result<Qcow2Shared> {
        let inval = |reason: String| Error::InvalidImage {
            path: path.to_owned(),
            reason,
        };
        let open_err = |source| Error::OpenImage {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(inval("qcow2 images must be regular files".into()));
        }
        lock::claim(&file, path, Role::qcow2(depth == 0, !read_only))?;
        let file = HostFile::new(file, recorder, "image");
        let file_len = meta.len();
        let mut head = vec![0u8; file_len.min(2 << 20) as usize];
        io::read_bytes(&file, 0, &mut head).map_err(open_err)?;
        let hdr = Header::parse(&head, file_len).map_err(|e| inval(e.to_string()))?;
        let cs = hdr.cluster_size();
        let data_raw = hdr.incompatible & header::INCOMPAT_DATA_FILE != 0
            && hdr.autoclear & header::AUTOCLEAR_DATA_RAW != 0;
        let data_file = if hdr.incompatible & header::INCOMPAT_DATA_FILE != 0 {
            let Some(name) = &hdr.data_file else {
                return Err(inval(
                    "the image uses an external data file but does not name it".into(),
                ));
            };
            if hdr.nb_snapshots > 0 {
                // Data clusters are not refcounted, so nothing would protect the snapshot's
                // data from being overwritten in place (QEMU refuses to create these).
                return Err(inval(
                    "internal snapshots in an image with an external data file are not \
                     supported"
                        .into(),
                ));
            }
            if data_raw && hdr.backing_file.is_some() {
                return Err(inval(
                    "an image with a raw external data file (data_file_raw) cannot have a \
                     backing file"
                        .into(),
                ));
            }
            let f = open_data_file(path, file.as_file(), name, read_only)?;
            Some(HostFile::new(f, recorder, "data"))
        } else {
            None
        };
        if !read_only && hdr.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(inval(
                "the image is marked corrupt; repair it with 'qemu-img check -r all' or open it \
                 read-only"
                    .into(),
            ));
        }
        // L1 table.
        let mut l1_bytes = vec![0u8; hdr.l1_size as usize * 8];
        io::read_bytes(&file, hdr.l1_table_offset, &mut l1_bytes).map_err(open_err)?;
        let l1_len = hdr.l1_size as usize;
        // Read-only images never grow: no reserve for them.
        let capacity = if read_only {
            l1_len
        } else {
            l1_len.max(MIN_L1_CAPACITY.min((header::MAX_L1_BYTES / 8) as usize))
        };
        let mut l1 = Vec::with_capacity(capacity);
        for i in 0..l1_len {
            let e = be64_at(&l1_bytes, i);
            L1Entry(e)
                .check(cs, file_len)
                .map_err(|m| inval(format!("L1 entry {i}: {m}")))?;
            l1.push(AtomicU64::new(e));
        }
        l1.resize_with(capacity, || AtomicU64::new(0));
        // Backing file.
        let backing = match &hdr.backing_file {
            None => None,
            Some(name) => Some(open_backing(
                path,
                name,
                hdr.backing_format.as_deref(),
                depth,
            )?),
        };
        let rt_len = hdr.refcount_table_clusters as usize * cs as usize / 8;
        let mut rt_bytes = vec![0u8; rt_len * 8];
        io::read_bytes(&file, hdr.refcount_table_offset, &mut rt_bytes).map_err(open_err)?;
        let rt: Vec<u64> = (0..rt_len).map(|i| be64_at(&rt_bytes, i)).collect();
        let state = MetaState {
            l1_offset: hdr.l1_table_offset,
            l1_clusters: (u64::from(hdr.l1_size) * 8).div_ceil(cs),
            rt_offset: hdr.refcount_table_offset,
            rt_clusters: hdr.refcount_table_clusters,
            rt,
            incompatible: hdr.incompatible,
            rt_dirty: false,
            rt_moved: false,
            autoclear: hdr.autoclear,
            rc_values: Vec::new(),
            rc_bytes: Vec::new(),
        };
        let words = if hdr.extended_l2() { 2 } else { 1 };
        let absent = Arc::new(L2Table::placeholder());
        let l2 = (0..capacity)
            .map(|_| ArcSwap::new(absent.clone()))
            .collect();
        let cache_tables = cache_tables_for(DEFAULT_CACHE_BYTES, hdr.cluster_bits);
        let hdr_size = hdr.size;
        let mut s = Qcow2Shared {
            path: path.to_owned(),
            file,
            cluster_bits: hdr.cluster_bits,
            size: AtomicU64::new(hdr.size),
            read_only,
            extended: hdr.extended_l2(),
            words,
            l1,
            l1_len: AtomicUsize::new(l1_len),
            l2,
            absent,
            cache_tables: AtomicUsize::new(cache_tables),
            loaded: AtomicUsize::new(0),
            hand: AtomicUsize::new(0),
            checked: (0..capacity.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            clusters: None,
            file_clusters: file_len.div_ceil(cs),
            backing,
            data_file,
            data_raw,
            bitmaps: None,
            state: Mutex::new(state),
            dirty_on_disk: AtomicBool::new(hdr.version == 2),
            meta_dirty: AtomicBool::new(false),
            l1_dirty: AtomicBool::new(false),
            corrupt: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            epoch: AtomicU64::new(1),
            slots: Mutex::new(Vec::new()),
            deferred: Mutex::new(Vec::new()),
            holes: Arc::default(),
            journal: None,
            published: AtomicU64::new(0),
            written_back: AtomicU64::new(0),
            resizing: Mutex::new(()),
            hdr,
        };
        if !read_only {
            let opened = open_journal(path, s.file.as_file(), s.cluster_bits, journal)?;
            let recovered = opened.as_ref().map_or(&[][..], |o| &o.recovered[..]);
            s.setup_writable(file_len, recovered).map_err(|e| match e {
                rebuild::OpenError::Invalid(r) => inval(r),
                rebuild::OpenError::Io(source) => open_err(source),
            })?;
            if let Some(o) = opened {
                // Whatever the file held is durable in the image now (or was stale).
                o.journal.start();
                debug!(
                    "{}: mapping journal {}",
                    path.display(),
                    o.journal.path().display()
                );
                s.journal = Some(o.journal);
            }
        }
        // Bitmaps are kept only when the extension is marked consistent (autoclear bit 0;
        // an older writer that did not know them cleared it).
        if let Some(ext) = s.hdr.bitmaps {
            if depth == 0 && s.hdr.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
                let load = !read_only;
                s.bitmaps = Some(
                    bitmap::Bitmaps::open(&s.file, ext, s.cluster_bits, hdr_size, file_len, load)
                        .map_err(|e| inval(format!("bitmaps: {e}")))?,
                );
            }
        }
        Ok(s)
    }

    /// Loads (or rebuilds) refcounts for a writable open. A dirty image first gets the
    /// mapping changes `recovered` from the journal of the daemon that left it dirty.
    pub(super) fn setup_writable(
        &mut self,
        file_len: u64,
        recovered: &[journal::Record],
    ) -> std::result::Result<(), rebuild::OpenError> {
        let dirty = self.hdr.incompatible & INCOMPAT_DIRTY != 0;
        if !dirty && !recovered.is_empty() {
            warn!(
                "{}: ignoring {} journaled mapping change(s): the image was closed cleanly \
                 since they were recorded",
                self.path.display(),
                recovered.len()
            );
        }
        // Refcounts are kept in memory, 8 bytes per host cluster: bound that.
        if file_len >> self.cluster_bits > MAX_HOST_CLUSTERS {
            return Err(rebuild::OpenError::Invalid(format!(
                "image file too large to open writable with {}-byte clusters ({} clusters, \
                 limit {MAX_HOST_CLUSTERS})",
                self.cluster_size(),
                file_len >> self.cluster_bits
            )));
        }
        let (rc, meta_clusters) = if dirty {
            warn!(
                "{}: image was not closed cleanly; rebuilding refcounts",
                self.path.display()
            );
            rebuild::rebuild(self, file_len)?
        } else {
            rebuild::load(self, file_len)?
        };
        let cs = self.cluster_size();
        let end = file_len
            .div_ceil(cs)
            .max(rc.iter().rposition(|&v| v != 0).map_or(0, |p| p as u64 + 1));
        let clusters = Clusters::new(rc, end, self.refcount_piece_shift());
        for c in meta_clusters {
            clusters.set_meta(c, true);
        }
        if !dirty {
            // Refcounts were trusted: keep the free clusters out of use until a background
            // check has made sure no table references them (holes.rs).
            let holes = clusters.take_holes();
            if holes.iter().any(|&w| w != 0) {
                let active = self.l1.iter().map(|e| e.load(Ordering::Relaxed)).collect();
                let l1s = rebuild::all_l1s(self, file_len, active)?;
                let file = self
                    .file
                    .as_file()
                    .try_clone()
                    .map_err(rebuild::OpenError::Io)?;
                holes::spawn(
                    file,
                    holes::Geometry {
                        cluster_bits: self.cluster_bits,
                        extended: self.extended,
                        data_file: self.data_file.is_some(),
                    },
                    l1s.into_iter().map(|(l1, _)| l1).collect(),
                    holes,
                    self.holes.clone(),
                );
            }
        }
        self.clusters = Some(clusters);
        if dirty {
            if !recovered.is_empty() {
                let n = replay::apply(self, recovered)?;
                info!(
                    "{}: replayed {n} mapping change(s) that requests had completed with \
                     before the previous daemon stopped",
                    self.path.display()
                );
            }
            rebuild::fix_copied_flags(self)?;
            if let Some(c) = &self.clusters {
                c.dirty_all();
            }
            self.dirty_on_disk.store(true, Ordering::Release);
            self.meta_dirty.store(true, Ordering::Release);
            self.close().map_err(rebuild::OpenError::Io)?;
            info!("{}: refcounts repaired", self.path.display());
        }
        Ok(())
    }
}

/// Opens the mapping journal of a writable image as `mode` asks; `None` means there is none
/// and metadata is written through instead (see [`JournalMode`]).
pub(super) fn open_journal(
    image: &Path,
    file: &File,
    cluster_bits: u32,
    mode: &JournalMode,
) -> Result<Option<journal::Opened>> {
    let dir = match mode {
        JournalMode::Off => return Ok(None),
        JournalMode::Default => Path::new(DEFAULT_JOURNAL_DIR),
        JournalMode::Dir(d) => d.as_path(),
    };
    match journal::Journal::open(dir, file, cluster_bits) {
        Ok(o) => Ok(Some(o)),
        Err(e) if *mode == JournalMode::Default => {
            warn!(
                "{}: no mapping journal in {DEFAULT_JOURNAL_DIR} ({e}); writing metadata back \
                 before completing each request that changes a mapping instead (slower; \
                 --journal-dir chooses another tmpfs directory)",
                image.display()
            );
            Ok(None)
        }
        Err(e) => Err(Error::InvalidOption(format!(
            "--journal-dir {}: {e}",
            dir.display()
        ))),
    }
}

/// Opens the external data file `name` of the image at `image` (a relative name is relative
/// to the image's directory, as for backing files). It must be a regular file or a block
/// device other than the image itself (guest writes into the image file would overwrite
/// its metadata).
pub(super) fn open_data_file(
    image: &Path,
    image_file: &File,
    name: &str,
    read_only: bool,
) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::InvalidImage {
            path: image.to_owned(),
            reason: format!("data file '{name}' is not a plain file name"),
        });
    }
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_owned()
    } else {
        image.parent().unwrap_or_else(|| Path::new(".")).join(p)
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&path)
        .map_err(|source| Error::OpenImage {
            path: path.clone(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| Error::OpenImage {
        path: path.clone(),
        source,
    })?;
    let bad = |reason: &str| Error::InvalidImage {
        path: path.clone(),
        reason: format!("external data file: {reason}"),
    };
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(bad("not a regular file or block device"));
    }
    let img = image_file.metadata().map_err(|source| Error::OpenImage {
        path: image.to_owned(),
        source,
    })?;
    if (img.dev(), img.ino()) == (meta.dev(), meta.ino()) {
        return Err(bad("it is the image file itself"));
    }
    lock::claim(&file, &path, Role::data_file(!read_only))?;
    Ok(file)
}

pub(super) fn open_backing(
    overlay: &Path,
    name: &str,
    format: Option<&str>,
    depth: u32,
) -> Result<Backing> {
    let inval = |reason: String| Error::InvalidImage {
        path: overlay.to_owned(),
        reason,
    };
    if depth + 1 >= MAX_BACKING_DEPTH {
        return Err(inval(format!(
            "backing chain deeper than {MAX_BACKING_DEPTH} images"
        )));
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(inval(format!(
            "backing file '{name}' is not a plain file name"
        )));
    }
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_owned()
    } else {
        overlay.parent().unwrap_or_else(|| Path::new(".")).join(p)
    };
    match format {
        Some("qcow2") => Ok(Backing::Qcow2(Arc::new(Qcow2Shared::open(
            &path,
            true,
            depth + 1,
            &JournalMode::Off,
            None,
        )?))),
        Some("raw") => {
            let file = File::open(&path).map_err(|source| Error::OpenImage {
                path: path.clone(),
                source,
            })?;
            lock::claim(&file, &path, Role::Backing)?;
            let size = file
                .metadata()
                .map_err(|source| Error::OpenImage {
                    path: path.clone(),
                    source,
                })?
                .len();
            Ok(Backing::Raw {
                file: HostFile::new(file, None, "backing"),
                size,
            })
        }
        Some(f) => Err(inval(format!(
            "backing file '{name}' has format '{f}'; only qcow2 and raw backing files are supported"
        ))),
        None => Err(inval(format!(
            "backing file '{name}' has no recorded format; refusing to probe it (set one with \
             'qemu-img rebase -u -b {name} -F raw|qcow2')"
        ))),
    }
}

/// Opens the file guest data lives in (the image, or its external data file) again with
/// O_DIRECT, through `/proc/self/fd` so that no path is looked up twice. Returns it with the
/// memory alignment O_DIRECT needs; refuses file systems without O_DIRECT and files that need
/// a larger offset alignment than guest data extents have.
pub(super) fn open_direct(shared: &Qcow2Shared, opts: &ImageOptions) -> Result<(HostFile, usize)> {
    let invalid = |reason: String| Error::InvalidImage {
        path: opts.path.clone(),
        reason,
    };
    let data = shared.data_io();
    let file = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", data.fd()))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => {
                invalid("the file system does not support O_DIRECT (--direct)".into())
            }
            _ => Error::OpenImage {
                path: opts.path.clone(),
                source: e,
            },
        })?;
    let block_device = file
        .metadata()
        .is_ok_and(|m| m.file_type().is_block_device());
    let (mem_align, offset_align) = crate::image::storage::direct_alignment(&file, block_device);
    // Guest data extents start at a multiple of the logical block size within a (sub)cluster.
    let granule = if shared.extended {
        shared.cluster_size() / l2::SUBCLUSTERS
    } else {
        shared.cluster_size()
    };
    let align = u64::from(opts.logical_block_size).min(granule);
    if offset_align as u64 > align {
        return Err(invalid(format!(
            "O_DIRECT on this file needs {offset_align}-byte aligned I/O, but guest data may sit \
             at {align}-byte multiples; use --logical-block-size {offset_align} (if the \
             clusters are at least that large) or drop --direct"
        )));
    }
    let recorder = opts.recorder.as_ref();
    let name = if shared.data_file.is_some() {
        "data"
    } else {
        "image"
    };
    Ok((HostFile::new(file, recorder, name), mem_align))
}
