CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

CREATE TABLE datasets (
	sha256 VARCHAR(64) NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	format VARCHAR(16) NOT NULL, 
	size BIGINT NOT NULL, 
	data BLOB NOT NULL, 
	created_at DATETIME NOT NULL, 
	CONSTRAINT pk_datasets PRIMARY KEY (sha256)
);

CREATE TABLE experiments (
	id INTEGER NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	spec JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	CONSTRAINT pk_experiments PRIMARY KEY (id), 
	CONSTRAINT uq_experiments_name UNIQUE (name)
);

CREATE TABLE runs (
	id INTEGER NOT NULL, 
	experiment_id INTEGER NOT NULL, 
	config JSON NOT NULL, 
	config_hash VARCHAR(64) NOT NULL, 
	optimizer VARCHAR(32) NOT NULL, 
	dataset VARCHAR(100) NOT NULL, 
	hidden VARCHAR(200) NOT NULL, 
	activation VARCHAR(32) NOT NULL, 
	seed INTEGER NOT NULL, 
	max_steps INTEGER NOT NULL, 
	learning_rate DOUBLE, 
	batch_size INTEGER, 
	momentum DOUBLE, 
	step_size DOUBLE, 
	temperature DOUBLE, 
	candidates INTEGER, 
	status VARCHAR(16) NOT NULL, 
	published BOOLEAN NOT NULL, 
	attempt INTEGER NOT NULL, 
	worker VARCHAR(200), 
	heartbeat_at DATETIME, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	cancel_requested BOOLEAN NOT NULL, 
	resumed_from_step INTEGER, 
	stop_reason VARCHAR(32), 
	error TEXT, 
	final_train_loss DOUBLE, 
	final_val_loss DOUBLE, 
	best_val_loss DOUBLE, 
	final_train_accuracy DOUBLE, 
	final_val_accuracy DOUBLE, 
	best_val_accuracy DOUBLE, 
	final_val_r2 DOUBLE, 
	best_val_r2 DOUBLE, 
	iterations INTEGER, 
	evaluations DOUBLE, 
	wall_seconds DOUBLE, published_at DATETIME, est_seconds DOUBLE, 
	CONSTRAINT pk_runs PRIMARY KEY (id), 
	CONSTRAINT fk_runs_experiment_id_experiments FOREIGN KEY(experiment_id) REFERENCES experiments (id) ON DELETE CASCADE, 
	CONSTRAINT ck_runs_status CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'diverged', 'cancelled'))
);

CREATE INDEX ix_runs_config_hash ON runs (config_hash);

CREATE INDEX ix_runs_experiment_status ON runs (experiment_id, status);

CREATE TABLE artifacts (
	run_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	format VARCHAR(16) NOT NULL, 
	shapes JSON NOT NULL, 
	step INTEGER, 
	data BLOB NOT NULL, 
	size BIGINT NOT NULL, 
	created_at DATETIME NOT NULL, 
	CONSTRAINT pk_artifacts PRIMARY KEY (run_id, kind), 
	CONSTRAINT fk_artifacts_run_id_runs FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE, 
	CONSTRAINT ck_artifacts_kind CHECK (kind IN ('weights', 'checkpoint'))
);

CREATE TABLE metrics (
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	train_loss DOUBLE, 
	val_loss DOUBLE, 
	train_accuracy DOUBLE, 
	val_accuracy DOUBLE, 
	train_r2 DOUBLE, 
	val_r2 DOUBLE, 
	train_mae DOUBLE, 
	val_mae DOUBLE, 
	evaluations DOUBLE, 
	elapsed DOUBLE, 
	grad_norm DOUBLE, 
	learning_rate DOUBLE, 
	step_size DOUBLE, 
	temperature DOUBLE, 
	acceptance_rate DOUBLE, 
	CONSTRAINT pk_metrics PRIMARY KEY (run_id, step), 
	CONSTRAINT fk_metrics_run_id_runs FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);

CREATE VIEW run_summary AS
SELECT
    r.id AS run_id,
    r.experiment_id,
    e.name AS experiment,
    r.optimizer,
    r.dataset,
    r.hidden,
    r.activation,
    r.seed,
    r.max_steps,
    r.learning_rate,
    r.batch_size,
    r.momentum,
    r.step_size,
    r.temperature,
    r.candidates,
    r.status,
    r.attempt,
    r.stop_reason,
    r.final_train_loss,
    r.final_val_loss,
    r.best_val_loss,
    r.final_train_accuracy,
    r.final_val_accuracy,
    r.best_val_accuracy,
    r.final_val_r2,
    r.best_val_r2,
    r.iterations,
    r.evaluations,
    r.wall_seconds AS duration_seconds,
    r.worker,
    r.created_at,
    r.started_at,
    r.finished_at,
    r.config_hash
FROM runs r
JOIN experiments e ON e.id = r.experiment_id;

CREATE VIEW experiment_progress AS
SELECT
    e.id AS experiment_id,
    e.name AS experiment,
    COUNT(r.id) AS runs,
    SUM(CASE WHEN r.status = 'queued' THEN 1 ELSE 0 END) AS queued,
    -- queued runs whose message never reached the broker (mlpq retry sends them)
    SUM(CASE WHEN r.status = 'queued' AND NOT r.published THEN 1 ELSE 0 END) AS unsent,
    SUM(CASE WHEN r.status = 'running' THEN 1 ELSE 0 END) AS running,
    SUM(CASE WHEN r.status = 'succeeded' THEN 1 ELSE 0 END) AS succeeded,
    SUM(CASE WHEN r.status = 'failed' THEN 1 ELSE 0 END) AS failed,
    SUM(CASE WHEN r.status = 'diverged' THEN 1 ELSE 0 END) AS diverged,
    SUM(CASE WHEN r.status = 'cancelled' THEN 1 ELSE 0 END) AS cancelled,
    MAX(r.best_val_accuracy) AS best_val_accuracy,
    MIN(r.best_val_loss) AS best_val_loss,
    e.created_at
FROM experiments e
LEFT JOIN runs r ON r.experiment_id = e.id
GROUP BY e.id, e.name, e.created_at;

CREATE VIEW run_groups AS
SELECT
    experiment_id, experiment, dataset, optimizer, hidden, activation, max_steps, learning_rate, batch_size, momentum, step_size, temperature, candidates,
    COUNT(*) AS n_runs,
    AVG(best_val_accuracy) AS mean_best_val_accuracy,
    CASE WHEN COUNT(best_val_accuracy) > 1 THEN
        (SUM(best_val_accuracy * best_val_accuracy) - SUM(best_val_accuracy) * SUM(best_val_accuracy) / COUNT(best_val_accuracy))
        / (COUNT(best_val_accuracy) - 1) END AS var_best_val_accuracy,
    AVG(final_val_accuracy) AS mean_final_val_accuracy,
    CASE WHEN COUNT(final_val_accuracy) > 1 THEN
        (SUM(final_val_accuracy * final_val_accuracy) - SUM(final_val_accuracy) * SUM(final_val_accuracy) / COUNT(final_val_accuracy))
        / (COUNT(final_val_accuracy) - 1) END AS var_final_val_accuracy,
    AVG(best_val_loss) AS mean_best_val_loss,
    CASE WHEN COUNT(best_val_loss) > 1 THEN
        (SUM(best_val_loss * best_val_loss) - SUM(best_val_loss) * SUM(best_val_loss) / COUNT(best_val_loss))
        / (COUNT(best_val_loss) - 1) END AS var_best_val_loss,
    AVG(final_val_loss) AS mean_final_val_loss,
    CASE WHEN COUNT(final_val_loss) > 1 THEN
        (SUM(final_val_loss * final_val_loss) - SUM(final_val_loss) * SUM(final_val_loss) / COUNT(final_val_loss))
        / (COUNT(final_val_loss) - 1) END AS var_final_val_loss,
    AVG(best_val_r2) AS mean_best_val_r2,
    CASE WHEN COUNT(best_val_r2) > 1 THEN
        (SUM(best_val_r2 * best_val_r2) - SUM(best_val_r2) * SUM(best_val_r2) / COUNT(best_val_r2))
        / (COUNT(best_val_r2) - 1) END AS var_best_val_r2,
    AVG(final_val_r2) AS mean_final_val_r2,
    CASE WHEN COUNT(final_val_r2) > 1 THEN
        (SUM(final_val_r2 * final_val_r2) - SUM(final_val_r2) * SUM(final_val_r2) / COUNT(final_val_r2))
        / (COUNT(final_val_r2) - 1) END AS var_final_val_r2,
    AVG(duration_seconds) AS mean_duration_seconds,
    CASE WHEN COUNT(duration_seconds) > 1 THEN
        (SUM(duration_seconds * duration_seconds) - SUM(duration_seconds) * SUM(duration_seconds) / COUNT(duration_seconds))
        / (COUNT(duration_seconds) - 1) END AS var_duration_seconds
FROM run_summary
WHERE status = 'succeeded'
GROUP BY experiment_id, experiment, dataset, optimizer, hidden, activation, max_steps, learning_rate, batch_size, momentum, step_size, temperature, candidates;

CREATE INDEX ix_runs_unsent ON runs (id) WHERE status = 'queued' AND NOT published;

CREATE INDEX ix_runs_in_broker ON runs (published_at) WHERE status = 'queued' AND published;

CREATE INDEX ix_runs_running_heartbeat ON runs (heartbeat_at) WHERE status = 'running';

INSERT INTO alembic_version (version_num) VALUES ('0006');
