"""Numbers shared by training, export and runtime. Plain Python: importing this never pulls in torch."""

# Diffusion (paper 4.3; authors' code: linear betas 1e-4..0.02, T = 1000, the UNet predicts z0).
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
CLIP_SAMPLE_RANGE = 1.0  # diffusers' DDIM default clip_sample=True clips the predicted z0 to [-1, 1]

# Latent space (paper 4.3: the Stable Diffusion latent scale, kept so LightVAE latents match the teacher's).
LATENT_SCALE = 0.18215
LATENT_CHANNELS = 4  # per map; the UNet sees mask + edge = 8
LATENT_DOWNSAMPLE = 8

# Training (paper 3.3 and 4.3).
PRIOR_RATE = 0.1  # lambda of eq. 15
SEGMENTATION_WEIGHT = 0.2  # alpha of eq. 10
EDGE_WIDTH = 7  # dilation width of eq. 7
DISTILL_LATENT_WEIGHT = 0.01  # lambda_lat of eq. 6

# Sampling defaults (paper 4.3).
DEFAULT_STEPS = 8
DEFAULT_ENSEMBLE = 5

# Image normalization: ImageNet statistics, as the Segformer / ResNet backbones expect.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
